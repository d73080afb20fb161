"""The connection configuration: one YAML file per connection under include/connections/.

The admin "configures and activates the connection" here: every object and field API name,
picklist value and identifier choice, because real vaults differ. Models mirror the YAML (see
include/connections/demo.yaml) and forbid unknown keys, so a typo fails on load with a
ConfigError naming the file, the key path and the problem.
"""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import yaml
from croniter import croniter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from clinical_crm import settings
from clinical_crm.errors import ConfigError
from clinical_crm.times import as_utc
from clinical_crm.vault.fields import MAX_BATCH

MAX_CONNECTIONS = 10  # Vault allows up to ten instances of the connection

# Vault API names: lowercase, a namespace suffix such as __v, __c, __sys, __clin, __ctms.
API_NAME = re.compile(r"^[a-z][a-z0-9_]*__[a-z]+$")


def _api_name(value: str) -> str:
    if not API_NAME.match(value):
        raise ValueError(
            f"{value!r} is not a Vault API name (lowercase letters, digits and _, "
            "ending in a namespace suffix such as __v, __c or __sys)"
        )
    return value


ApiName = Annotated[str, AfterValidator(_api_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# -- small sections ------------------------------------------------------------------------------

class Schedule(Strict):
    cron: str
    start_date: datetime

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        if not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a valid cron expression")
        return value

    @field_validator("start_date")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return as_utc(value)


class Reconcile(Strict):
    """The reconcile__<name> DAG (engine/reconcile.py): when it runs and whether it repairs."""

    cron: str = "@daily"
    repair: bool = False  # re-send the newest version of what drifted (manual runs: param `repair`)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        return Schedule._valid_cron(value)


class Features(Strict):
    clinical_activities: bool
    studies_and_sites: bool
    medical_activities: bool
    automated_activities: bool


class Identifiers(Strict):
    ctms_person_field: ApiName  # field of the CTMS Person that matches ...
    crm_account_field: ApiName  # ... this field of the CRM Account


class Status(Strict):
    submitted: ApiName
    planned: ApiName


class Deletion(Strict):
    subject_suffix: str = Field(min_length=1)
    crm_status_field: ApiName
    crm_deleted_status: ApiName
    crm_active_status: ApiName
    ctms_inactive_status: ApiName


class Quality(Strict):
    max_failing_share: float = Field(ge=0, le=1)


EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")


def _email(value: str) -> str:
    if not EMAIL.match(value):
        raise ValueError(f"{value!r} is not an email address")
    return value


Email = Annotated[str, AfterValidator(_email)]


class Alerts(Strict):
    """Who is told, through which Airflow connections (email, Slack webhook), and when
    (clinical_crm.engine.alerts). A failed run always alerts; each threshold alerts only when set."""
    smtp_conn_id: str | None = Field(default=None, min_length=1)
    to: list[Email] = []
    from_: Email | None = Field(default=None, alias="from")  # default: the SMTP connection's from_email
    slack_webhook_conn_id: str | None = Field(default=None, min_length=1)
    quarantine_threshold: int | None = Field(default=None, ge=0)
    quarantine_max_age_days: float | None = Field(default=None, gt=0)
    max_lag_minutes: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _a_channel(self):
        if self.smtp_conn_id and not self.to:
            raise ValueError("smtp_conn_id needs recipients in 'to'")
        if self.to and not self.smtp_conn_id:
            raise ValueError("'to' needs smtp_conn_id (the Airflow SMTP connection that sends the emails)")
        if not self.smtp_conn_id and not self.slack_webhook_conn_id:
            raise ValueError("set smtp_conn_id (with 'to') or slack_webhook_conn_id, or remove 'alerts'")
        return self


class Retention(Strict):
    """How long the history a connection accumulates is kept (engine/housekeeping.py, applied by
    the daily `housekeeping__<name>` DAG). Nothing an open quarantine row, a queued deletion mark,
    the id map, the source versions or reconciliation needs is removed, whatever these say."""

    # validation results and Data Docs pages moved out of the live GX project (the index keeps
    # the newest `data_docs_runs` runs) are deleted after this many days
    gx_results_days: int = Field(default=30, ge=1)
    # runs whose pages the Data Docs index (and the page's links) keeps: a day of hourly runs (a
    # run name is shared by both flows); older runs' results and pages are moved to
    # <reports>/<name>/gx_archive by the run that pushes them out
    data_docs_runs: int = Field(default=24, ge=1)
    run_files_days: int = Field(default=30, ge=1)  # runs/<direction>/<run>.json, .quarantine.csv/.json
    outcomes_days: int = Field(default=90, ge=1)  # per-record outcomes and DQ summaries of older runs
    staging_hours: int = Field(default=48, ge=1)  # staged files of runs that crashed or failed
    drift_days: int = Field(default=90, ge=1)  # drift rows of older reconciliation runs (the latest run's are kept)
    cron: str = "@daily"  # when housekeeping__<name> runs

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        return Schedule._valid_cron(value)


MAX_CONCURRENCY = 16  # calls in flight per run; the vault's pool must hold this many slots


class Load(Strict):
    batch_size: int = Field(default=MAX_BATCH, ge=1, le=MAX_BATCH)
    query_page_size: int = Field(default=1000, ge=1, le=1000)
    # Calls one run keeps in flight at once: write calls per target object, and independent
    # reads. The extract and load tasks take this many slots of their vault's pool, so the
    # calls of every run on one vault stay within the pool's slots.
    concurrency: int = Field(default=4, ge=1, le=MAX_CONCURRENCY)


# -- object sections: object API name + field API names by role ---------------------------------

class NameFields(Strict):
    first_name: ApiName
    last_name: ApiName
    email: ApiName


class NamedObject(Strict):
    object: ApiName
    fields: NameFields


class StudyFields(Strict):
    title: ApiName
    phase: ApiName
    therapeutic_area: ApiName


class StudyCountryFields(Strict):
    study: ApiName
    country: ApiName


class SiteFields(Strict):
    study: ApiName
    study_country: ApiName
    site_name: ApiName


class StudyPersonFields(Strict):
    study: ApiName
    person: ApiName
    site: ApiName


class ActivityFields(Strict):
    person: ApiName
    date: ApiName
    channel: ApiName
    complete: ApiName
    from_: ApiName = Field(alias="from")
    subject: ApiName
    study: ApiName
    site: ApiName
    study_country: ApiName
    study_person: ApiName
    monitoring_event: ApiName
    communication_log: ApiName
    external_id: ApiName


class MonitoringEventFields(Strict):
    study: ApiName
    study_country: ApiName
    site: ApiName
    person: ApiName
    date: ApiName
    visit_method: ApiName  # Monitoring Visit Method: a Monitoring Event has no Channel (Veeva's help)
    complete: ApiName
    update_required: ApiName  # Activity Update Required


class CommunicationLogFields(Strict):
    study: ApiName
    site: ApiName
    person: ApiName
    date: ApiName
    channel: ApiName
    subject: ApiName
    complete: ApiName
    update_required: ApiName


class StudyObject(Strict):
    object: ApiName
    fields: StudyFields


class StudyCountryObject(Strict):
    object: ApiName
    fields: StudyCountryFields


class SiteObject(Strict):
    object: ApiName
    fields: SiteFields


class StudyPersonObject(Strict):
    object: ApiName
    fields: StudyPersonFields


class ActivityObject(Strict):
    object: ApiName
    clinical_type: ApiName  # object type API names of crm_activity__v
    medical_type: ApiName
    fields: ActivityFields

    @model_validator(mode="after")
    def _distinct_types(self) -> ActivityObject:
        if self.clinical_type == self.medical_type:
            raise ValueError("clinical_type and medical_type must be different object types")
        return self


class MonitoringEventObject(Strict):
    object: ApiName
    fields: MonitoringEventFields


class CommunicationLogObject(Strict):
    object: ApiName
    fields: CommunicationLogFields


class Ctms(Strict):
    user: NamedObject
    person: NamedObject
    study: StudyObject
    study_country: StudyCountryObject
    site: SiteObject
    study_person: StudyPersonObject
    activity: ActivityObject
    monitoring_event: MonitoringEventObject | None = None  # needed for automated_activities
    communication_log: CommunicationLogObject | None = None


class AccountObject(Strict):
    object: ApiName


class CallFields(Strict):
    account: ApiName
    date: ApiName
    channel: ApiName
    status: ApiName
    subject: ApiName
    send_to_clinical: ApiName


class ClinicalStudyFields(Strict):
    external_id: ApiName
    title: ApiName
    phase: ApiName
    therapeutic_area: ApiName


class ClinicalSiteFields(Strict):
    external_id: ApiName
    study: ApiName
    site_name: ApiName
    country: ApiName


class InteractionFields(Strict):
    external_id: ApiName
    account: ApiName
    date: ApiName
    channel: ApiName
    status: ApiName
    from_: ApiName = Field(alias="from")
    subject: ApiName
    study: ApiName
    site: ApiName
    study_country: ApiName
    context: ApiName


class CallObject(Strict):
    object: ApiName
    fields: CallFields


class ClinicalStudyObject(Strict):
    object: ApiName
    fields: ClinicalStudyFields


class ClinicalSiteObject(Strict):
    object: ApiName
    fields: ClinicalSiteFields


class InteractionObject(Strict):
    object: ApiName
    fields: InteractionFields


class Crm(Strict):
    user: NamedObject
    account: AccountObject
    call: CallObject
    clinical_study: ClinicalStudyObject | None = None  # needed for studies_and_sites
    clinical_site: ClinicalSiteObject | None = None
    interaction: InteractionObject


# -- the whole file --------------------------------------------------------------------------------

class ConnectionConfig(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")  # used in DAG ids
    description: str = ""
    active: bool
    ctms_conn_id: str = Field(min_length=1)
    crm_conn_id: str = Field(min_length=1)
    schedule: Schedule
    lookback_minutes: int = Field(ge=0)
    features: Features
    identifiers: Identifiers
    channel_map: dict[ApiName, ApiName] = Field(min_length=1)
    status: Status
    deletion: Deletion
    quality: Quality
    load: Load = Load()
    reconcile: Reconcile = Reconcile()
    retention: Retention = Retention()
    alerts: Alerts | None = None  # off unless set
    ctms: Ctms
    crm: Crm
    source_file: Path | None = Field(default=None, exclude=True)

    @field_validator("channel_map")
    @classmethod
    def _one_to_one(cls, value: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for ctms_value, crm_value in value.items():
            if crm_value in seen:
                raise ValueError(
                    f"CRM value {crm_value!r} is mapped from both {seen[crm_value]!r} and {ctms_value!r}; "
                    "the map must be 1:1 because inbound calls use it inverted"
                )
            seen[crm_value] = ctms_value
        return value

    @model_validator(mode="after")
    def _sections_for_features(self) -> ConnectionConfig:
        if self.ctms_conn_id == self.crm_conn_id:
            raise ValueError("ctms_conn_id and crm_conn_id must name two different Airflow connections")
        if self.features.automated_activities:
            for section in ("monitoring_event", "communication_log"):
                if getattr(self.ctms, section) is None:
                    raise ValueError(f"ctms.{section} is required when features.automated_activities is true")
        if self.features.studies_and_sites:
            for section in ("clinical_study", "clinical_site"):
                if getattr(self.crm, section) is None:
                    raise ValueError(f"crm.{section} is required when features.studies_and_sites is true")
        return self

    @property
    def inbound_channel_map(self) -> dict[str, str]:
        """CRM Call Channel -> CTMS Channel (the channel map inverted)."""
        return {crm: ctms for ctms, crm in self.channel_map.items()}


def _describe(error: ErrorDetails) -> str:
    """One pydantic error as `key.path: what is wrong`."""
    path = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        problem = "unknown key (check the spelling; see include/connections/demo.yaml)"
    elif kind == "missing":
        problem = "required key is missing"
    else:
        problem = error["msg"].removeprefix("Value error, ")
        if kind not in ("value_error", "assertion_error") and "input" in error:
            problem += f" (got {error['input']!r})"
    return f"{path}: {problem}" if path else problem


def parse_connection(data: Any, source: str | Path = "<memory>") -> ConnectionConfig:
    """Validate an already-parsed YAML document."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the file must hold a mapping of keys (got {type(data).__name__})")
    try:
        config = ConnectionConfig.model_validate(data)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(e) for e in exc.errors(include_url=False))
        raise ConfigError(f"{source}: invalid connection configuration:\n  {problems}") from None
    return config.model_copy(update={"source_file": Path(source)})


def load_connection(path: str | Path) -> ConnectionConfig:
    """Load and validate one connection file; ConfigError names the file, key and problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    try:
        # libyaml's C loader when present: ten files parse in ~0.04 s instead of ~0.5 s (DAG parse time)
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    return parse_connection(data, path)


def load_connections(directory: str | Path | None = None) -> list[ConnectionConfig]:
    """Every connection file (*.yaml, *.yml) of a directory, sorted by file name."""
    directory = Path(directory) if directory is not None else settings.connections_dir()
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml"))
    if len(files) > MAX_CONNECTIONS:
        raise ConfigError(
            f"{directory}: {len(files)} connection files; at most {MAX_CONNECTIONS} connections are allowed"
        )
    configs = [load_connection(p) for p in files]
    by_name: dict[str, Path | None] = {}
    for config in configs:
        if config.name in by_name:
            raise ConfigError(
                f"{config.source_file}: name: {config.name!r} is already used by {by_name[config.name]}"
            )
        by_name[config.name] = config.source_file
    return configs
