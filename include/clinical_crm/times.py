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
