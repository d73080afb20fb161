"""Data quality: Great Expectations suites, per-row quarantine reasons, the run's DQ report.

Each rule is written once (`Rule`): its expectations (what GX validates and reports in Data
Docs) and its row mask + readable reason (what quarantines a row) read the same column with the
same parameters. Rules look at a *check frame* with neutral column names (person, channel,
account_matches, ...) prepared from the staged records; cross-system matching (Person
identifier -> CRM Account, Account identifier -> CTMS Person) is a pandas merge whose result
column (`account_matches` / `person_matches`) GX then validates.

Two suites per direction: `mapping_completeness` and `identifier_match`.
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
from clinical_crm.transform import blank, relationship, study_reference_columns, text

log = logging.getLogger(__name__)

MAPPING_COMPLETENESS = "mapping_completeness"
IDENTIFIER_MATCH = "identifier_match"
EARLIEST_DATE = date(1990, 1, 1)  # an activity before this is a typo, not history
LATEST_YEARS_AHEAD = 10  # planned activities may be in the future, not in another decade


from clinical_crm.quality_errors import QualityThresholdExceeded  # noqa: E402,F401 (re-exported)


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


def _not_null(column: str) -> Callable[[], list]:
    return lambda: [_gx().expectations.ExpectColumnValuesToNotBeNull(column=column)]


def _in_set(column: str, values: list) -> Callable[[], list]:
    # only for small sets (picklist maps, booleans): large sets are merges, see module doc
    def build():
        gx = _gx()
        return [gx.expectations.ExpectColumnValuesToNotBeNull(column=column),
                gx.expectations.ExpectColumnValuesToBeInSet(column=column, value_set=list(values))]
    return build


def _exactly_one(column: str) -> Callable[[], list]:
    return lambda: [_gx().expectations.ExpectColumnValuesToBeBetween(column=column, min_value=1, max_value=1)]


def date_bounds(today: date | None = None) -> tuple[int, int]:
    """Valid activity dates as YYYYMMDD numbers (numbers keep the GX expectation simple)."""
    today = today or datetime.now(timezone.utc).date()
    high = today.replace(year=today.year + LATEST_YEARS_AHEAD, day=min(today.day, 28))
    return int(EARLIEST_DATE.strftime("%Y%m%d")), int(high.strftime("%Y%m%d"))


def _date_rule(today: date | None) -> Rule:
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


def outbound_rules(cfg, today: date | None = None) -> list[Rule]:
    """Rules for Clinical Activities going to CRM."""
    ident = cfg.identifiers
    channels = list(cfg.channel_map)
    rules = [
        Rule("person_present", MAPPING_COMPLETENESS, "person", _not_null("person"),
             lambda s: s.map(blank).astype(bool), lambda r: "no Person on the Clinical Activity"),
        Rule("person_has_identifier", MAPPING_COMPLETENESS, "person_identifier", _not_null("person_identifier"),
             lambda s: s.map(blank).astype(bool),
             lambda r: f"Person {r['person_label'] or ''} has no {ident.ctms_person_field}".replace("  ", " ")),
        Rule("channel_mapped", MAPPING_COMPLETENESS, "channel", _in_set("channel", channels),
             lambda s: ~s.isin(channels),
             lambda r: "channel missing" if blank(r["channel"]) else f"channel '{r['channel']}' is not in the channel map"),
        _date_rule(today),
    ]
    if cfg.features.studies_and_sites:
        rules += [
            Rule("study_resolvable", MAPPING_COMPLETENESS, "study_resolved", _in_set("study_resolved", [True]),
                 lambda s: s != True,  # noqa: E712 (element-wise)
                 lambda r: f"Study {r['study_ref']} has no Clinical Study in CRM (not sent yet)"),
            Rule("site_resolvable", MAPPING_COMPLETENESS, "site_resolved", _in_set("site_resolved", [True]),
                 lambda s: s != True,  # noqa: E712
                 lambda r: f"Study Site {r['site_ref']} has no Clinical Site in CRM (not sent yet)"),
        ]
    rules.append(Rule(
        "person_account_match", IDENTIFIER_MATCH, "account_matches", _exactly_one("account_matches"),
        lambda s: s != 1,
        lambda r: _match_reason(r["account_matches"], "CRM Account", ident.crm_account_field, r["person_identifier"]),
    ))
    return rules


def inbound_rules(cfg, today: date | None = None) -> list[Rule]:
    """Rules for CRM calls going to CTMS as Medical Activities."""
    ident = cfg.identifiers
    channels = list(cfg.channel_map.values())
    return [
        Rule("account_present", MAPPING_COMPLETENESS, "account", _not_null("account"),
             lambda s: s.map(blank).astype(bool), lambda r: "no Account on the call"),
        Rule("account_has_identifier", MAPPING_COMPLETENESS, "account_identifier", _not_null("account_identifier"),
             lambda s: s.map(blank).astype(bool),
             lambda r: f"Account {r['account'] or ''} has no {ident.crm_account_field}".replace("  ", " ")),
        Rule("channel_mapped", MAPPING_COMPLETENESS, "channel", _in_set("channel", channels),
             lambda s: ~s.isin(channels),
             lambda r: "channel missing" if blank(r["channel"]) else f"channel '{r['channel']}' is not in the channel map"),
        # Status: Submitted -> Complete Yes, any other status (Planned, Saved, ...) -> No; only a
        # missing status is a defect.
        Rule("status_present", MAPPING_COMPLETENESS, "status", _not_null("status"),
             lambda s: s.map(blank).astype(bool), lambda r: "status missing"),
        _date_rule(today),
        Rule("account_person_match", IDENTIFIER_MATCH, "person_matches", _exactly_one("person_matches"),
             lambda s: s != 1,
             lambda r: _match_reason(r["person_matches"], "CTMS Person", ident.ctms_person_field, r["account_identifier"])),
    ]


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


def activity_checks(activities: pd.DataFrame, accounts: pd.DataFrame, known_studies: set[str],
                    known_sites: set[str], cfg) -> pd.DataFrame:
    """The check frame of Clinical Activities, plus `account_id` for the rows that match."""
    a = cfg.ctms.activity.fields
    person = relationship(a.person)
    p = cfg.ctms.person.fields
    ident_col = f"{person}.{cfg.identifiers.ctms_person_field}"
    col = lambda name: activities[name] if name in activities else pd.Series([None] * len(activities), dtype=object, index=activities.index)  # noqa: E731
    checks = pd.DataFrame(index=activities.index)
    checks["source_id"] = activities["id"]
    checks["person"] = col(a.person).map(text)
    checks["person_identifier"] = col(ident_col).map(text)
    checks["person_label"] = (col(f"{person}.{p.first_name}").map(lambda v: text(v) or "") + " " +
                              col(f"{person}.{p.last_name}").map(lambda v: text(v) or "")).str.strip()
    checks["channel"] = col(a.channel).map(text)
    checks["date"] = col(a.date).map(text)
    checks["date_number"] = _date_numbers(col(a.date))
    if cfg.features.studies_and_sites:
        refs = study_reference_columns(cfg)
        checks["study_ref"] = col(refs["study"]).map(text)
        checks["site_ref"] = col(refs["site"]).map(text)
        checks["study_resolved"] = checks["study_ref"].map(lambda v: blank(v) or v in known_studies).astype(object)
        checks["site_resolved"] = checks["site_ref"].map(lambda v: blank(v) or v in known_sites).astype(object)
    account_field = cfg.identifiers.crm_account_field
    checks["account_matches"] = _match_counts(checks["person_identifier"], accounts, account_field)
    checks["account_id"] = _unique_target(checks["person_identifier"], accounts, account_field)
    return checks


def call_checks(calls: pd.DataFrame, persons: pd.DataFrame, cfg) -> pd.DataFrame:
    """The check frame of CRM calls, plus `person_id` for the rows that match."""
    c = cfg.crm.call.fields
    ident_col = f"{relationship(c.account)}.{cfg.identifiers.crm_account_field}"
    col = lambda name: calls[name] if name in calls else pd.Series([None] * len(calls), dtype=object, index=calls.index)  # noqa: E731
    checks = pd.DataFrame(index=calls.index)
    checks["source_id"] = calls["id"]
    checks["account"] = col(c.account).map(text)
    checks["account_identifier"] = col(ident_col).map(text)
    checks["channel"] = col(c.channel).map(text)
    checks["status"] = col(c.status).map(text)
    checks["date"] = col(c.date).map(text)
    checks["date_number"] = _date_numbers(col(c.date))
    person_field = cfg.identifiers.ctms_person_field
    checks["person_matches"] = _match_counts(checks["account_identifier"], persons, person_field)
    checks["person_id"] = _unique_target(checks["account_identifier"], persons, person_field)
    return checks


def row_reasons(checks: pd.DataFrame, rules: list[Rule]) -> tuple[pd.Series, dict[str, int]]:
    """Every reason each row fails (an empty list for good rows), and failing rows per rule."""
    reasons = pd.Series([[] for _ in range(len(checks))], index=checks.index, dtype=object)
    per_rule: dict[str, int] = {}
    for rule in rules:
        mask = rule.failing(checks[rule.column]).fillna(True).astype(bool)
        if mask.any():
            per_rule[rule.name] = int(mask.sum())
        for index in checks.index[mask]:
            row = {k: (None if blank(v) else v) for k, v in checks.loc[index].to_dict().items()}
            reasons[index] = reasons[index] + [rule.reason(row)]
    return reasons, per_rule


# ---------------------------------------------------------------- Great Expectations


@dataclass
class Validator:
    """One GX file context per connection; validations of a run go in it, Data Docs built once."""

    connection: str
    run_key: str
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
        frame = checks.drop(columns=[c for c in ("account_id", "person_id") if c in checks])
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
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_key)
    path = settings.reports_dir() / connection / "runs" / direction / f"{safe}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str))
    return str(path)


def check_threshold(rows: int, failing: int, max_failing_share: float) -> None:
    """Fail the run (and load nothing) only when the failing share passes the threshold."""
    if rows and failing / rows > max_failing_share:
        raise QualityThresholdExceeded(
            f"{failing} of {rows} rows ({failing / rows:.0%}) failed the data quality checks, "
            f"more than the allowed {max_failing_share:.0%}: nothing was loaded")
