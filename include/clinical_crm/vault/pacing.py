"""Pacing from Vault's burst limit: never a call past it, whatever the number of threads.

Vault counts API calls per fixed 5-minute window and delays every call past the limit
(REFERENCE.md: rate limits); each response says how many calls remain in the window
(`X-VaultAPI-BurstLimitRemaining`). `BurstGate` is shared by every thread of one client: a call
may start while the calls known to remain, less those already in flight, stay above the reserve;
otherwise it waits for the next window. Windows are taken as aligned to the clock (a 5-minute
window starts at :00, :05, ...); should a vault's windows start elsewhere, the first response after
the expected start still shows few calls left and the gate waits one more window: slower, never
delayed, as long as the reserve is at least the calls in flight.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

# A call sent this close after the computed start of a window may still be counted in the one
# before (clocks differ): its answer does not tell what the new window has left. A small part
# of the window (so that the client's windows stay the vault's, whatever their length).
CLOCK_MARGIN_SECONDS = 1.0
CLOCK_MARGIN_SHARE = 0.02


class BurstGate:
    """`reserve`: calls left unspent in each window (for the vault's other users and the calls
    of other processes in flight); `window_seconds`: Vault's burst window; `clock` for tests."""

    def __init__(self, reserve: int, window_seconds: float = 300.0, clock: Callable[[], float] = time.time):
        if window_seconds <= 0:
            raise ValueError(f"burst window_seconds must be above 0, not {window_seconds}")
        self.reserve = max(0, int(reserve))
        self.window_seconds = float(window_seconds)
        self.margin = min(CLOCK_MARGIN_SECONDS, self.window_seconds * CLOCK_MARGIN_SHARE)
        self._clock = clock
        self._lock = threading.Lock()
        self._window: int | None = None   # the window the figures below are about
        self._remaining: int | None = None  # fewest calls left seen in it (None: unknown yet)
        self._in_flight = 0

    def _current(self) -> int:
        return int((self._clock() - self.margin) // self.window_seconds)

    def _try_start(self) -> tuple[bool, float, int]:
        """(True, 0, window) when a call may start now (it is then counted in flight), else
        (False, the time to the next window, window)."""
        with self._lock:
            window = self._current()
            if self._window is None or window > self._window:  # never back (a clock set back)
                self._window, self._remaining = window, None
            window = self._window
            if self.reserve <= 0 or self._remaining is None or self._remaining - self._in_flight > self.reserve:
                self._in_flight += 1
                return True, 0.0, window
            return False, (window + 1) * self.window_seconds + self.margin - self._clock(), window

    def enter(self, pause: Callable[[float], None]) -> int:
        """Wait (through `pause`, which counts the time) until a call may start; returns the
        window it starts in, for `leave`. A reserve of 0 turns pacing off."""
        while True:
            started, wait, window = self._try_start()
            if started:
                return window
            pause(max(wait, 0.01))
            with self._lock:  # the next window has begun: nothing is known of it yet
                if self._window == window:
                    self._window, self._remaining = window + 1, None

    def leave(self, window: int, remaining: int | None) -> None:
        """The call started in `window` ended; `remaining`: what its response said (None: no header)."""
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            if remaining is not None and window == self._window:
                self._remaining = remaining if self._remaining is None else min(self._remaining, remaining)

    def must_wait(self) -> bool:
        """Would a call wait now (read-only, for logs and tests)."""
        with self._lock:
            return (self._window == self._current() and self.reserve > 0 and self._remaining is not None
                    and self._remaining - self._in_flight <= self.reserve)
