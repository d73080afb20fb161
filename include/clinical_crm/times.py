"""One rule for moments in time: every datetime the connection keeps or compares is aware UTC."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import overload


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: str | datetime | None) -> datetime | None: ...


def as_utc(value: str | datetime | None) -> datetime | None:
    """An ISO 8601 text or a datetime as an aware UTC datetime (naive means UTC); None and ""
    stay None. SQLite hands stored datetimes back naive: they were stored as UTC."""
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


def now() -> datetime:
    return datetime.now(timezone.utc)


def duration(seconds: float | None) -> str:
    """A duration as `2 d 3 h`, `3 h 5 min`, `4 min 2 s` or `12 s` ("" for None)."""
    if seconds is None:
        return ""
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"
