"""Connection configuration: the demo file loads; each kind of invalid file names file, key, problem."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from clinical_crm import settings
from clinical_crm.config import load_connection, load_connections
from clinical_crm.errors import ConfigError

DEMO = settings.PROJECT_ROOT / "include" / "connections" / "demo.yaml"


@pytest.fixture
def demo() -> dict:
    return yaml.safe_load(DEMO.read_text())


def write(tmp_path: Path, data, name: str = "conn.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(tmp_path: Path, data) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_connection(path)
    message = str(caught.value)
    assert str(path) in message  # every message names the file
    return message


def test_demo_file_loads_with_attribute_access():
    cfg = load_connection(DEMO)
    assert cfg.name == "demo" and cfg.active
    assert cfg.ctms.activity.fields.person == "person__v"
    assert cfg.ctms.activity.fields.from_ == "from__v"
    assert cfg.crm.interaction.fields.from_ == "from__v"
    assert cfg.ctms.activity.clinical_type == "clinical_activity__v"
    assert cfg.schedule.start_date.utcoffset().total_seconds() == 0
    assert cfg.inbound_channel_map["phone__v"] == "phone__v"
    assert cfg.load.batch_size == 500
    assert cfg.source_file == DEMO


def test_misspelled_field_role_is_named(tmp_path, demo):
    fields = demo["ctms"]["activity"]["fields"]
    fields["persn"] = fields.pop("person")
    message = error_of(tmp_path, demo)
    assert "ctms.activity.fields.persn: unknown key" in message
    assert "ctms.activity.fields.person: required key is missing" in message


def test_bad_api_name_is_named(tmp_path, demo):
    demo["crm"]["interaction"]["fields"]["subject"] = "Subject"
    message = error_of(tmp_path, demo)
    assert "crm.interaction.fields.subject: 'Subject' is not a Vault API name" in message


def test_missing_top_level_key(tmp_path, demo):
    del demo["crm_conn_id"]
    assert "crm_conn_id: required key is missing" in error_of(tmp_path, demo)


def test_channel_map_must_be_one_to_one(tmp_path, demo):
    demo["channel_map"]["video__v"] = "phone__v"
    message = error_of(tmp_path, demo)
    assert "channel_map:" in message and "'phone__v' is mapped from both" in message


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("lookback_minutes",), -5, "lookback_minutes: Input should be greater than or equal to 0"),
        (("quality", "max_failing_share"), 1.5, "quality.max_failing_share: Input should be less than or equal to 1"),
        (("quality", "max_failing_share"), -0.1,
         "quality.max_failing_share: Input should be greater than or equal to 0"),
        (("load", "batch_size"), 501, "load.batch_size: Input should be less than or equal to 500"),
        (("load", "batch_size"), 0, "load.batch_size: Input should be greater than or equal to 1"),
        (("schedule", "cron"), "61 * * * *", "schedule.cron: '61 * * * *' is not a valid cron expression"),
        (("schedule", "start_date"), "someday", "schedule.start_date: Input should be a valid datetime"),
        (("active",), "perhaps", "active: Input should be a valid boolean"),
        (("name",), "Demo Connection", "name: String should match pattern"),
    ],
)
def test_out_of_range_values(tmp_path, demo, path, value, expected):
    target = demo
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert expected in error_of(tmp_path, demo)


def test_feature_needs_its_section(tmp_path, demo):
    del demo["ctms"]["monitoring_event"]
    assert "ctms.monitoring_event is required when features.automated_activities is true" in error_of(tmp_path, demo)
    demo["features"]["automated_activities"] = False
    assert load_connection(write(tmp_path, demo)).ctms.monitoring_event is None


def test_same_conn_id_for_both_vaults(tmp_path, demo):
    demo["crm_conn_id"] = demo["ctms_conn_id"]
    assert "must name two different Airflow connections" in error_of(tmp_path, demo)


def test_yaml_syntax_error_has_line_number(tmp_path):
    text = DEMO.read_text().replace("active: true", "active: [true", 1)
    message = error_of(tmp_path, text)
    assert "YAML syntax error at line" in message


def test_file_that_is_not_a_mapping(tmp_path):
    assert "must hold a mapping" in error_of(tmp_path, "- just\n- a list\n")
    assert "must hold a mapping" in error_of(tmp_path, "")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_connection(tmp_path / "nope.yaml")


def test_load_connections_reads_yaml_and_yml_only(tmp_path, demo):
    write(tmp_path, demo, "a.yaml")
    second = copy.deepcopy(demo) | {"name": "second"}
    write(tmp_path, second, "b.yml")
    (tmp_path / "notes.txt").write_text("not a connection")
    assert [c.name for c in load_connections(tmp_path)] == ["demo", "second"]


def test_load_connections_defaults_to_settings_dir(monkeypatch, tmp_path, demo):
    write(tmp_path, demo, "only.yaml")
    monkeypatch.setenv("CLINICAL_CRM_CONNECTIONS_DIR", str(tmp_path))
    assert [c.name for c in load_connections()] == ["demo"]


def test_duplicate_names_are_refused(tmp_path, demo):
    write(tmp_path, demo, "a.yaml")
    write(tmp_path, demo, "b.yaml")
    with pytest.raises(ConfigError, match=r"b\.yaml: name: 'demo' is already used by .*a\.yaml"):
        load_connections(tmp_path)


def test_at_most_ten_connections(tmp_path, demo):
    for number in range(11):
        write(tmp_path, copy.deepcopy(demo) | {"name": f"conn_{number}"}, f"c{number:02d}.yaml")
    with pytest.raises(ConfigError, match="11 connection files; at most 10"):
        load_connections(tmp_path)


def test_alerts_are_off_unless_set_and_checked(tmp_path, demo):
    assert load_connection(write(tmp_path, demo)).alerts is None
    demo["alerts"] = {"smtp_conn_id": "smtp_ops", "to": ["ops@example.org"], "from": "crm@example.org",
                      "quarantine_threshold": 50, "quarantine_max_age_days": 7, "max_lag_minutes": 180}
    alerts = load_connection(write(tmp_path, demo)).alerts
    assert (alerts.to, alerts.from_, alerts.max_lag_minutes) == (["ops@example.org"], "crm@example.org", 180)
    demo["alerts"] = {"smtp_conn_id": "smtp_ops", "to": ["ops"], "quarantine_treshold": 5}
    message = error_of(tmp_path, demo)
    assert "alerts.to.0: 'ops' is not an email address" in message
    assert "alerts.quarantine_treshold: unknown key" in message


def test_alerts_need_a_channel(tmp_path, demo):
    demo["alerts"] = {"max_lag_minutes": 60}
    assert "set smtp_conn_id (with 'to') or slack_webhook_conn_id" in error_of(tmp_path, demo)
    demo["alerts"] = {"smtp_conn_id": "smtp_ops"}
    assert "smtp_conn_id needs recipients in 'to'" in error_of(tmp_path, demo)
    demo["alerts"] = {"slack_webhook_conn_id": "slack_ops", "max_lag_minutes": 60}
    assert load_connection(write(tmp_path, demo)).alerts.slack_webhook_conn_id == "slack_ops"
