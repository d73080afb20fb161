"""Progress of long work (a load, a read, a reconciliation): logged at a steady pace, and the
latest figures kept where the page can show them (the run's `runs.progress`).

    progress = Progress("load crm_activity__v", total=1_000_000, writer=for_run(ledger, run_id),
                        burst=lambda: client.burst_remaining)
    for batch in ...:
        ...
        progress.advance(len(batch))
    progress.finish()

A line is logged (and the writer called) when about `every_seconds` (30 s) have passed since the
last one, or when another `every_share` (5 %) of the total is done, whichever comes first, and
once at `finish()` (the line of the end: reaching the total logs nothing before it): records
done of total, the share, the rate, the time elapsed, the time left (ETA, from the rate so far;
only when the total is known) and the calls left in the vault's burst window (what the client
last saw in X-VaultAPI-BurstLimitRemaining; absent when unknown).

The total may be unknown at the start, or grow (`add_total`): a read learns it from each query's
first page (`responseDetails.total`), a read of several queries adds each one's total as it starts.
Thread-safe: the reads of a lookup advance one Progress from several threads.

Any long step can use it: `writer` is any callable taking the figures (a dict); `for_run` gives
one that keeps them in the run's ledger row under `what`, `for_reconcile_run` one that keeps them
in a reconciliation's own row (`reconcile_runs.progress`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from clinical_crm.times import duration

log = logging.getLogger(__name__)

EVERY_SECONDS = 30.0
EVERY_SHARE = 0.05

Writer = Callable[[dict[str, Any]], None]


def for_run(ledger, run_id: int | None, key: str | None = None) -> Writer | None:
    """A writer keeping the latest figures in the run's ledger row (`runs.progress[key]`, key
    defaulting to the figures' `what`); None without a run."""
    if ledger is None or not run_id:
        return None
    return _writer(lambda k, figures: ledger.set_progress(run_id, k, figures), f"run {run_id}", key)


def for_reconcile_run(ledger, run_id: int | None, key: str | None = None) -> Writer | None:
    """The same for a reconciliation, which has runs of its own (`reconcile_runs.progress[key]`)."""
    if ledger is None or not run_id:
        return None
    return _writer(lambda k, figures: ledger.set_reconcile_progress(run_id, k, figures),
                   f"reconciliation run {run_id}", key)


def _writer(store: Callable[[str, dict[str, Any]], None], name: str, key: str | None) -> Writer:
    def write(figures: dict[str, Any]) -> None:
        try:
            store(key or figures["what"], figures)
        except Exception as error:  # progress is for people: it never fails the work it describes
            log.warning("could not record the progress of %s: %s: %s", name, type(error).__name__, error)

    return write


class Progress:
    """Records done of a total, logged and written at a steady pace (see the module)."""

    def __init__(self, what: str, total: int | None = None, writer: Writer | None = None,
                 burst: Callable[[], int | None] | None = None, clock: Callable[[], float] | None = None,
                 every_seconds: float = EVERY_SECONDS, every_share: float = EVERY_SHARE,
                 logger: logging.Logger | None = None, unit: str = "records"):
        self.what, self.total, self.writer, self.burst = what, total, writer, burst
        self.clock = clock or time.monotonic
        self.every_seconds, self.every_share = every_seconds, every_share
        self.log, self.unit = logger or log, unit
        self.done = 0
        self.started = self.clock()
        self._last_at, self._last_done = self.started, 0
        self._lock = threading.Lock()
        self.finished = False
        self.reports = 0  # lines logged so far (tests, and whoever wants to know)

    def add_total(self, n: int | None) -> None:
        """More work became known (e.g. the total of a query's first page)."""
        if n is None:
            return
        with self._lock:
            self.total = (self.total or 0) + int(n)

    def advance(self, n: int = 1) -> None:
        """`n` more records done; logs and writes when it is time."""
        with self._lock:
            self.done += int(n)
            now = self.clock()
            due = now - self._last_at >= self.every_seconds
            if not due and self.total:
                due = (self.done - self._last_done) >= max(1.0, self.every_share * self.total)
            if not due or (self.total is not None and self.done >= self.total):  # the end: finish() says it
                return
            self._last_at, self._last_done = now, self.done
            figures = self._figures(now)
        self._report(figures)

    def finish(self, state: str = "done") -> dict[str, Any]:
        """The last line (always logged and written): `state` done, or e.g. failed."""
        with self._lock:
            self.finished = True
            figures = self._figures(self.clock()) | {"state": state}
        self._report(figures)
        return figures

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        """The block's end is the work's: its last line says done, or failed when it raised."""
        self.finish("done" if error_type is None else "failed")

    def figures(self) -> dict[str, Any]:
        """The current figures, without logging them."""
        with self._lock:
            return self._figures(self.clock())

    def _figures(self, now: float) -> dict[str, Any]:
        elapsed = max(now - self.started, 0.0)
        rate = self.done / elapsed if elapsed > 0 else None
        total = self.total
        left = max(total - self.done, 0) if total is not None else None
        eta = left / rate if left is not None and rate else (0.0 if left == 0 else None)
        burst = None
        if self.burst is not None:
            try:
                burst = self.burst()
            except Exception:
                burst = None
        return {"what": self.what, "done": self.done, "total": total,
                "share": round(self.done / total, 4) if total else None,
                "rate": round(rate, 2) if rate is not None else None, "elapsed_seconds": round(elapsed, 1),
                "eta_seconds": round(eta, 1) if eta is not None else None, "burst_remaining": burst,
                "state": "running", "unit": self.unit,
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def _report(self, figures: dict[str, Any]) -> None:
        self.reports += 1
        self.log.info("progress %s", line(figures))
        if self.writer is not None:
            self.writer(figures)


def line(figures: dict[str, Any]) -> str:
    """The figures as one line: `load x: 1200 of 5000 records (24%), 40.0/s, elapsed 30 s, ETA
    1 min 35 s, 812 calls left in the burst window`."""
    unit = figures.get("unit") or "records"
    total = figures.get("total")
    done = f"{figures['done']} of {total} {unit}" if total is not None else f"{figures['done']} {unit}"
    if figures.get("share") is not None:
        done += f" ({figures['share'] * 100:.0f}%)"
    parts = [f"{figures['what']}: {done}"]
    if figures.get("rate") is not None:
        parts.append(f"{figures['rate']:.1f}/s")
    parts.append(f"elapsed {duration(figures.get('elapsed_seconds')) or '0 s'}")
    if figures.get("state", "running") == "running":
        eta = figures.get("eta_seconds")
        parts.append(f"ETA {duration(eta)}" if eta is not None else "ETA unknown")
    else:
        parts.append(str(figures["state"]))
    if figures.get("burst_remaining") is not None:
        parts.append(f"{figures['burst_remaining']} calls left in the burst window")
    return ", ".join(parts)
