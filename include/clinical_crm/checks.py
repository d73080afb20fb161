"""The data-quality rules, declared: what Great Expectations validates, and the readable reason
of a row that fails. The engine (engine/quality.py) runs them and takes the failing rows from
GX's validation result, so each rule is written once and the Data Docs and the quarantine agree.

Rules look at a *check frame* with neutral column names (source_id, person, channel,
account_matches, ...) that each flow prepares from its staged records (flows/*: quality_rules
and the checks); cross-system matching (Person identifier -> CRM Account, Account identifier ->
CTMS Person) is a pandas merge (`add_match`) whose count column GX then validates.

GX's column map expectations skip missing values: every rule on a column that may be empty
pairs its test with a not-null expectation.

Two suites per flow: `mapping_completeness` and `identifier_match`.

The flows import this module when the DAGs are parsed: pandas and GX are imported on first use.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING

from clinical_crm.values import blank, text

if TYPE_CHECKING:
    import pandas as pd

MAPPING_COMPLETENESS = "mapping_completeness"
IDENTIFIER_MATCH = "identifier_match"
SUITES = (MAPPING_COMPLETENESS, IDENTIFIER_MATCH)
SOURCE_ID = "source_id"  # the check frame's record id: GX names failing rows by it
EARLIEST_DATE = date(1990, 1, 1)  # an activity before this is a typo, not history
LATEST_YEARS_AHEAD = 10  # planned activities may be in the future, not in another decade


@dataclass(frozen=True)
class Rule:
    """One rule: GX expectations on `column` (a row failing any of them fails the rule) and the
    readable reason for one failing row (a check-frame row as a dict, missing values None)."""

    name: str
    suite: str
    column: str
    expectations: Callable[[], list]  # GX expectation objects on `column`
    reason: Callable[[dict], str]


def load_gx():
    """Great Expectations, imported on first use (seconds, and most of the objects the process holds)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    # before the import: importing GX logs every registration (~150 lines) at INFO
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    return gx


def not_null(column: str) -> Callable[[], list]:
    return lambda: [load_gx().expectations.ExpectColumnValuesToNotBeNull(column=column)]


def in_set(column: str, values: list) -> Callable[[], list]:
    # only for small sets (picklist maps, booleans): large sets are merges, see module doc
    def build():
        gx = load_gx()
        return [gx.expectations.ExpectColumnValuesToNotBeNull(column=column),
                gx.expectations.ExpectColumnValuesToBeInSet(column=column, value_set=list(values))]
    return build


def exactly_one(column: str) -> Callable[[], list]:
    return lambda: [load_gx().expectations.ExpectColumnValuesToBeBetween(column=column, min_value=1, max_value=1)]


def date_bounds(today: date | None = None) -> tuple[int, int]:
    """Valid activity dates as YYYYMMDD numbers (numbers keep the GX expectation simple)."""
    today = today or datetime.now(timezone.utc).date()
    high = today.replace(year=today.year + LATEST_YEARS_AHEAD, day=min(today.day, 28))
    return int(EARLIEST_DATE.strftime("%Y%m%d")), int(high.strftime("%Y%m%d"))


def channel_rule(channels: list[str]) -> Rule:
    """The channel is one the channel map knows (outbound: its keys, inbound: its values)."""
    return Rule("channel_mapped", MAPPING_COMPLETENESS, "channel", in_set("channel", channels),
                lambda r: "channel missing" if blank(r["channel"]) else f"channel '{r['channel']}' is not in the channel map")


def match_rule(name: str, count_column: str, key_column: str, what: str, field_name: str) -> Rule:
    """The key matches exactly one record on the other side (see add_match)."""
    return Rule(name, IDENTIFIER_MATCH, count_column, exactly_one(count_column),
                lambda r: _match_reason(r[count_column], what, field_name, r[key_column]))


def identifier_rule(name: str, key_column: str, record_column: str, found_column: str, what: str, vault: str,
                    field_name: str) -> Rule:
    """The record a row refers to (a Person, an Account) carries the identifier field
    (`key_column`). The reason names the referenced record by id, never by a person's name: a
    reference whose record no longer exists (`record_column` set, `found_column`, the
    relationship's id, empty) says so instead of "has no identifier"."""
    def reason(r: dict) -> str:
        record = r[record_column]
        if blank(record):
            return f"no {what}, so no {field_name} to match"
        if blank(r[found_column]):
            return (f"{what} {record} does not exist in {vault} (deleted, or not readable by the integration "
                    f"user): set an existing {what} on the record")
        return f"{what} {record} has no {field_name}: fill it in on the {what} in {vault}"

    return Rule(name, MAPPING_COMPLETENESS, key_column, not_null(key_column), reason)


def date_rule(today: date | None = None) -> Rule:
    """A real date within the bounds (`date_number` is missing when the text is no real date)."""
    low, high = date_bounds(today)

    def expectations():
        gx = load_gx()
        return [gx.expectations.ExpectColumnValuesToNotBeNull(column="date_number"),
                gx.expectations.ExpectColumnValuesToBeBetween(column="date_number", min_value=low, max_value=high)]

    return Rule("date_valid", MAPPING_COMPLETENESS, "date_number", expectations,
                lambda r: ("date missing" if blank(r["date"]) else
                           f"date '{r['date']}' is not a valid date between {low} and {high} (YYYYMMDD)"))


def _match_reason(matches, what: str, field_name: str, value) -> str:
    if blank(value):
        return f"no {field_name} to match a {what} with"
    if matches == 0:
        return f"no {what} has {field_name} = '{value}'"
    return f"ambiguous: {matches} {what}s have {field_name} = '{value}'"


# ---------------------------------------------------------------- check frames (pandas merges)


def _date_numbers(values: pd.Series) -> pd.Series:
    """YYYY-MM-DD text -> YYYYMMDD number; NaN when missing or not a real date."""
    import pandas as pd

    parsed = pd.to_datetime(values.map(text), format="%Y-%m-%d", errors="coerce")
    return parsed.dt.strftime("%Y%m%d").astype(float)


def _match_counts(keys: pd.Series, candidates: pd.DataFrame, key_column: str) -> pd.Series:
    """How many candidate records carry each key (0 when none): a merge, not an in-set check."""
    import pandas as pd

    counts = (candidates.assign(_key=candidates[key_column].map(text)).dropna(subset=["_key"])
              .groupby("_key").size().rename("_matches").reset_index())
    merged = pd.DataFrame({"_key": keys.map(text)}).merge(counts, on="_key", how="left")
    return merged["_matches"].fillna(0).astype(int).set_axis(keys.index)


def _unique_target(keys: pd.Series, candidates: pd.DataFrame, key_column: str) -> pd.Series:
    """The candidate id for keys matching exactly one candidate, else None."""
    import pandas as pd

    found = candidates.assign(_key=candidates[key_column].map(text)).dropna(subset=["_key"])
    found = found.drop_duplicates("_key", keep=False)[["_key", "id"]]
    merged = pd.DataFrame({"_key": keys.map(text)}).merge(found, on="_key", how="left")
    return merged["id"].astype(object).where(merged["id"].notna(), None).set_axis(keys.index)


def column_of(frame: pd.DataFrame) -> Callable[[str], pd.Series]:
    """A column by name, or an empty one when the frame lacks it."""
    import pandas as pd

    return lambda name: (frame[name] if name in frame else
                         pd.Series([None] * len(frame), dtype=object, index=frame.index))


def check_frame(frame: pd.DataFrame, channel: pd.Series, date_values: pd.Series) -> pd.DataFrame:
    """The columns every flow's check frame has: source_id, channel, date, date_number."""
    import pandas as pd

    checks = pd.DataFrame(index=frame.index)
    checks[SOURCE_ID] = frame["id"]
    checks["channel"] = channel.map(text)
    checks["date"] = date_values.map(text)
    checks["date_number"] = _date_numbers(date_values)
    return checks


def add_match(checks: pd.DataFrame, key_column: str, candidates: pd.DataFrame, candidate_field: str,
              count_column: str, id_column: str) -> None:
    """How many candidates carry each row's key (`count_column`), and the candidate's id where
    exactly one does (`id_column`): cross-system identifier matching as a merge."""
    checks[count_column] = _match_counts(checks[key_column], candidates, candidate_field)
    checks[id_column] = _unique_target(checks[key_column], candidates, candidate_field)
