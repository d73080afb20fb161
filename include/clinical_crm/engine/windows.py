"""The window rule: which modification times a run covers, so that no window is ever skipped.

A run covers from min(its data interval start, the end of the last successful window of the
same connection and direction) minus the lookback, to its data interval end. A failed or
missed run is therefore healed by the next success. A manual run may set the window with the
params `window_start` / `window_end` (ISO 8601); without them it reaches the moment it was
triggered for (its logical date; now when it has none), not just the last full interval, so
"run it now" moves a record created a minute ago.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from clinical_crm.times import as_utc


@dataclass(frozen=True)
class Window:
    """The modification times a run covers: (start, end]."""

    start: datetime
    end: datetime


def run_window(
    data_interval_start: datetime | None,
    data_interval_end: datetime | None,
    last_success_end: datetime | None,
    lookback_minutes: int,
    *,
    window_start: str | datetime | None = None,
    window_end: str | datetime | None = None,
    first_start: datetime | None = None,
    now: datetime | None = None,
    triggered_at: datetime | None = None,
) -> Window:
    """The window a run covers.

    `window_start` / `window_end` (manual params) are taken as given when set. Otherwise the
    start is the earlier of the data interval start and the last successful window's end, less
    the lookback; with neither, `first_start` (the schedule's start date). The end is the data
    interval end (for a manual run, `triggered_at` when later), or now.
    """
    now = as_utc(now) or datetime.now(timezone.utc)
    interval_end = as_utc(data_interval_end)
    if interval_end is not None and triggered_at is not None:
        interval_end = max(interval_end, as_utc(triggered_at))
    end = as_utc(window_end) or interval_end or now
    explicit_start = as_utc(window_start)
    if explicit_start is not None:
        start = explicit_start
    else:
        candidates = [t for t in (as_utc(data_interval_start), as_utc(last_success_end)) if t]
        if candidates:
            start = min(candidates) - timedelta(minutes=lookback_minutes)
        else:
            start = as_utc(first_start) or end - timedelta(minutes=lookback_minutes)
    if start > end:
        raise ValueError(f"window start {start.isoformat()} is after its end {end.isoformat()}")
    return Window(start=start, end=end)
