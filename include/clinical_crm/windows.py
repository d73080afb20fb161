"""The window rule: which modification times a run covers, so that no window is ever skipped.

A run covers from min(its data interval start, the end of the last successful window of the
same connection and direction) minus the lookback, to its data interval end. A failed or
missed run is therefore healed by the next success. A manual run may set the window with the
params `window_start` / `window_end` (ISO 8601); a manual run without a data interval ends now.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    def as_dict(self) -> dict[str, str]:
        return {"window_start": self.start.isoformat(), "window_end": self.end.isoformat()}


def parse_time(value: str | datetime | None) -> datetime | None:
    """An ISO 8601 text or datetime as an aware UTC datetime (naive means UTC); None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        # a plain datetime: Airflow hands pendulum DateTimes, whose arithmetic with a stdlib
        # timezone can drop the tzinfo (naive results that then refuse to compare)
        moment = datetime.fromisoformat(value.isoformat()) if type(value) is not datetime else value
    else:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


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
) -> Window:
    """The window a run covers.

    `window_start` / `window_end` (manual params) are taken as given when set. Otherwise the
    start is the earlier of the data interval start and the last successful window's end, less
    the lookback; with neither, `first_start` (the schedule's start date). The end is the data
    interval end, or now.
    """
    now = parse_time(now) or datetime.now(timezone.utc)
    end = parse_time(window_end) or parse_time(data_interval_end) or now
    explicit_start = parse_time(window_start)
    if explicit_start is not None:
        start = explicit_start
    else:
        candidates = [t for t in (parse_time(data_interval_start), parse_time(last_success_end)) if t]
        if candidates:
            start = min(candidates) - timedelta(minutes=lookback_minutes)
        else:
            start = parse_time(first_start) or end - timedelta(minutes=lookback_minutes)
    if start > end:
        raise ValueError(f"window start {start.isoformat()} is after its end {end.isoformat()}")
    return Window(start=start, end=end)
