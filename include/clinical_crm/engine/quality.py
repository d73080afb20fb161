"""The data-quality gate: Great Expectations suites, per-row quarantine reasons, the DQ report.

Each rule is written once (`Rule`): its expectations (what GX validates and reports in Data
Docs) and its row mask + readable reason (what quarantines a row) read the same column with the
same parameters. Rules look at a *check frame* with neutral column names (person, channel,
account_matches, ...) that each flow prepares from its staged records (flows/*: quality_rules
and the checks); cross-system matching (Person identifier -> CRM Account, Account identifier ->
CTMS Person) is a pandas merge (`add_match`) whose count column GX then validates.

Two suites per flow: `mapping_completeness` and `identifier_match`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import pandas as pd

from clinical_crm import settings
from clinical_crm.errors import QualityThresholdExceeded
from clinical_crm.values import blank, text

log = logging.getLogger(__name__)

MAPPING_COMPLETENESS = "mapping_completeness"
IDENTIFIER_MATCH = "identifier_match"
EARLIEST_DATE = date(1990, 1, 1)  # an activity before this is a typo, not history
LATEST_YEARS_AHEAD = 10  # planned activities may be in the future, not in another decade


# ---------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    name: str
    suite: str
    column: str
    expectations: Callable[[], list]  # GX expectation objects on `column`
    failing: Callable[[pd.Series], pd.Series]  # row mask on `column`: True = rule broken
    reason: Callable[[dict], str]  # readable reason for one failing row (a check-frame row)


def _gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    # before the import: importing GX logs every registration (~150 lines) at INFO
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    return gx


def import_gx() -> None:
    """Import Great Expectations now (seconds, and most of the objects the process holds)."""
    _gx()


def not_null(column: str) -> Callable[[], list]:
    return lambda: [_gx().expectations.ExpectColumnValuesToNotBeNull(column=column)]


def in_set(column: str, values: list) -> Callable[[], list]:
    # only for small sets (picklist maps, booleans): large sets are merges, see module doc
    def build():
        gx = _gx()
        return [gx.expectations.ExpectColumnValuesToNotBeNull(column=column),
                gx.expectations.ExpectColumnValuesToBeInSet(column=column, value_set=list(values))]
    return build


def exactly_one(column: str) -> Callable[[], list]:
    return lambda: [_gx().expectations.ExpectColumnValuesToBeBetween(column=column, min_value=1, max_value=1)]


def date_bounds(today: date | None = None) -> tuple[int, int]:
    """Valid activity dates as YYYYMMDD numbers (numbers keep the GX expectation simple)."""
    today = today or datetime.now(timezone.utc).date()
    high = today.replace(year=today.year + LATEST_YEARS_AHEAD, day=min(today.day, 28))
    return int(EARLIEST_DATE.strftime("%Y%m%d")), int(high.strftime("%Y%m%d"))


def blank_mask(values: pd.Series) -> pd.Series:
    return values.map(blank).astype(bool)


def not_true(values: pd.Series) -> pd.Series:
    return values != True  # noqa: E712 (element-wise)


def channel_rule(channels: list[str]) -> Rule:
    """The channel is one the channel map knows (outbound: its keys, inbound: its values)."""
    return Rule("channel_mapped", MAPPING_COMPLETENESS, "channel", in_set("channel", channels),
                lambda s: ~s.isin(channels),
                lambda r: "channel missing" if blank(r["channel"]) else f"channel '{r['channel']}' is not in the channel map")


def match_rule(name: str, count_column: str, key_column: str, what: str, field_name: str) -> Rule:
    """The key matches exactly one record on the other side (see add_match)."""
    return Rule(name, IDENTIFIER_MATCH, count_column, exactly_one(count_column), lambda s: s != 1,
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

    return Rule(name, MAPPING_COMPLETENESS, key_column, not_null(key_column), blank_mask, reason)


def date_rule(today: date | None = None) -> Rule:
    low, high = date_bounds(today)

    def expectations():
        gx = _gx()
        return [gx.expectations.ExpectColumnValuesToNotBeNull(column="date_number"),
                gx.expectations.ExpectColumnValuesToBeBetween(column="date_number", min_value=low, max_value=high)]

    return Rule(
        "date_valid", MAPPING_COMPLETENESS, "date_number", expectations,
        lambda s: s.isna() | (s < low) | (s > high),
        lambda r: ("date missing" if blank(r["date"]) else
                   f"date '{r['date']}' is not a valid date between {low} and {high} (YYYYMMDD)"),
    )


def _match_reason(matches, what: str, field_name: str, value) -> str:
    if blank(value):
        return f"no {field_name} to match a {what} with"
    if matches == 0:
        return f"no {what} has {field_name} = '{value}'"
    return f"ambiguous: {matches} {what}s have {field_name} = '{value}'"


# ---------------------------------------------------------------- check frames (pandas merges)


def _date_numbers(values: pd.Series) -> pd.Series:
    """YYYY-MM-DD text -> YYYYMMDD number; NaN when missing or not a real date."""
    parsed = pd.to_datetime(values.map(text), format="%Y-%m-%d", errors="coerce")
    return parsed.dt.strftime("%Y%m%d").astype(float)


def _match_counts(keys: pd.Series, candidates: pd.DataFrame, key_column: str) -> pd.Series:
    """How many candidate records carry each key (0 when none): a merge, not an in-set check."""
    counts = (candidates.assign(_key=candidates[key_column].map(text)).dropna(subset=["_key"])
              .groupby("_key").size().rename("_matches").reset_index())
    merged = pd.DataFrame({"_key": keys.map(text)}).merge(counts, on="_key", how="left")
    return merged["_matches"].fillna(0).astype(int).set_axis(keys.index)


def _unique_target(keys: pd.Series, candidates: pd.DataFrame, key_column: str) -> pd.Series:
    """The candidate id for keys matching exactly one candidate, else None."""
    found = candidates.assign(_key=candidates[key_column].map(text)).dropna(subset=["_key"])
    found = found.drop_duplicates("_key", keep=False)[["_key", "id"]]
    merged = pd.DataFrame({"_key": keys.map(text)}).merge(found, on="_key", how="left")
    return merged["id"].astype(object).where(merged["id"].notna(), None).set_axis(keys.index)


def column_of(frame: pd.DataFrame) -> Callable[[str], pd.Series]:
    """A column by name, or an empty one when the frame lacks it."""
    return lambda name: (frame[name] if name in frame else
                         pd.Series([None] * len(frame), dtype=object, index=frame.index))


def check_frame(frame: pd.DataFrame, channel: pd.Series, date_values: pd.Series) -> pd.DataFrame:
    """The columns every flow's check frame has: source_id, channel, date, date_number."""
    checks = pd.DataFrame(index=frame.index)
    checks["source_id"] = frame["id"]
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


def row_findings(checks: pd.DataFrame, rules: list[Rule]) -> tuple[pd.Series, dict[str, int]]:
    """Every (rule name, reason) each row fails (an empty list for good rows), and failing rows
    per rule."""
    findings = pd.Series([[] for _ in range(len(checks))], index=checks.index, dtype=object)
    per_rule: dict[str, int] = {}
    for rule in rules:
        mask = rule.failing(checks[rule.column]).fillna(True).astype(bool)
        if mask.any():
            per_rule[rule.name] = int(mask.sum())
        for index in checks.index[mask]:
            row = {k: (None if blank(v) else v) for k, v in checks.loc[index].to_dict().items()}
            findings[index] = findings[index] + [(rule.name, rule.reason(row))]
    return findings, per_rule


def row_reasons(checks: pd.DataFrame, rules: list[Rule]) -> tuple[pd.Series, dict[str, int]]:
    """Every reason each row fails (an empty list for good rows), and failing rows per rule."""
    findings, per_rule = row_findings(checks, rules)
    return findings.map(lambda found: [reason for _, reason in found]), per_rule


# ---------------------------------------------------------------- Great Expectations


@dataclass
class Validator:
    """One GX file context per connection; validations of a run go in it, Data Docs built once."""

    connection: str
    run_key: str
    matched_columns: tuple[str, ...] = ()  # target ids beside the checks: not validated
    root: Path = field(init=False)
    results: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.root = settings.reports_dir() / self.connection / "gx"  # GX makes this folder itself
        self._context = None

    @property
    def context(self):
        if self._context is None:
            gx = _gx()
            from great_expectations.data_context.types.base import ProgressBarsConfig

            self.root.parent.mkdir(parents=True, exist_ok=True)
            context = gx.get_context(mode="file", project_root_dir=str(self.root.parent))
            context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
            context.variables.save()
            self._context = context
        return self._context

    @contextlib.contextmanager
    def _locked(self):
        """Both DAGs of a connection share its GX project: one writer at a time (file lock)."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with open(self.root.parent / ".gx.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._context = None  # re-read the project: the other DAG may have changed it
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def validate(self, object_name: str, checks: pd.DataFrame, rules: list[Rule]) -> list[dict]:
        """Run each suite's expectations over the check frame; returns one summary per suite."""
        with self._locked():
            return self._validate(object_name, checks, rules)

    def _validate(self, object_name: str, checks: pd.DataFrame, rules: list[Rule]) -> list[dict]:
        gx = _gx()
        context = self.context
        source = context.data_sources.add_or_update_pandas(name=f"{self.connection}_checks")
        try:
            asset = source.get_asset(object_name)
        except LookupError:
            asset = source.add_dataframe_asset(name=object_name)
        try:
            batch = asset.get_batch_definition("whole_frame")
        except (KeyError, LookupError):
            batch = asset.add_batch_definition_whole_dataframe("whole_frame")
        frame = checks.drop(columns=[c for c in self.matched_columns if c in checks])
        summaries = []
        for suite_name in (MAPPING_COMPLETENESS, IDENTIFIER_MATCH):
            suite_rules = [r for r in rules if r.suite == suite_name]
            name = f"{self.connection}.{object_name}.{suite_name}"
            suite = gx.ExpectationSuite(name=name, expectations=[e for r in suite_rules for e in r.expectations()])
            suite = context.suites.add_or_update(suite)
            definition = context.validation_definitions.add_or_update(
                gx.ValidationDefinition(name=name, data=batch, suite=suite))
            result = definition.run(batch_parameters={"dataframe": frame},
                                    result_format="SUMMARY",
                                    run_id=gx.RunIdentifier(run_name=self.run_key))
            summaries.append({"object": object_name, "suite": suite_name, "success": bool(result.success),
                              "evaluated": int(result.statistics.get("evaluated_expectations", 0)),
                              "failed": int(result.statistics.get("unsuccessful_expectations", 0))})
        self.results += summaries
        return summaries

    def build_docs(self) -> str:
        """Build this run's Data Docs pages and the index; returns the path of index.html.

        Only this run's validation results are rendered: by default GX re-renders every result
        the project holds, so each hourly run would redo the pages of all the runs before it."""
        with self._locked():
            context = self.context
            mine = [key for key in context.validation_results_store.list_keys()
                    if key.run_id.run_name == self.run_key]
            context.build_data_docs(resource_identifiers=mine)
        return str(self.root / "uncommitted" / "data_docs" / "local_site" / "index.html")


def write_summary(connection: str, direction: str, run_key: str, summary: dict) -> str:
    """The run's JSON summary next to the Data Docs: <reports>/<connection>/runs/<direction>/<run>.json"""
    from clinical_crm.engine.quarantine_report import run_file

    path = run_file(connection, direction, run_key, ".json")
    path.write_text(json.dumps(summary, indent=2, default=str))
    return str(path)


def check_threshold(rows: int, failing: int, max_failing_share: float) -> None:
    """Fail the run (and load nothing) only when the failing share passes the threshold."""
    if rows and failing / rows > max_failing_share:
        raise QualityThresholdExceeded(
            f"{failing} of {rows} rows ({failing / rows:.0%}) failed the data quality checks, "
            f"more than the allowed {max_failing_share:.0%}: nothing was loaded")
