"""Preflight against the two sandbox vaults over HTTP; the hook and the CLI with Airflow connections."""
from __future__ import annotations

import importlib.metadata

import json
import os
import subprocess
import sys

import pytest
import yaml

from clinical_crm import settings
from clinical_crm.vault.client import VaultClient
from clinical_crm.config import parse_connection
from clinical_crm.preflight import report, run_preflight

DEMO = settings.PROJECT_ROOT / "include" / "connections" / "demo.yaml"


@pytest.fixture
def demo() -> dict:
    return yaml.safe_load(DEMO.read_text())


def preflight(data: dict, ctms, crm, crm_user: str = "integration@sandbox.example"):
    cfg = parse_connection(data, "test.yaml")
    servers = {cfg.ctms_conn_id: (ctms, "integration@sandbox.example"), cfg.crm_conn_id: (crm, crm_user)}

    def get_client(conn_id: str) -> VaultClient:
        server, user = servers[conn_id]
        return VaultClient(server.url, user, "sandbox", max_retries=1)

    checks = run_preflight(cfg, get_client)
    return checks, [c.line() for c in checks if c.failed]


def test_demo_configuration_passes(demo, ctms, crm):
    checks, failed = preflight(demo, ctms, crm)
    assert failed == []
    assert len(checks) > 100
    lines = [c.line() for c in checks]
    assert "OK    ctms  field crm_activity__v.person__v (ctms.activity.fields.person): object" in lines
    assert any(line.startswith("OK    crm   field clinical_interaction__v.external_id__v") and "unique" in line
               for line in lines)
    assert any("permissions on crm_activity__v object type medical_activity__v" in line for line in lines)


def test_wrong_field_name_fails_naming_the_field(demo, ctms, crm):
    demo["ctms"]["activity"]["fields"]["subject"] = "subjet__v"
    demo["crm"]["interaction"]["fields"]["channel"] = "channel__v"
    _, failed = preflight(demo, ctms, crm)
    assert failed == [
        "FAIL  ctms  field crm_activity__v.subjet__v (ctms.activity.fields.subject): "
        "crm_activity__v has no field subjet__v",
        "FAIL  crm   field clinical_interaction__v.channel__v (crm.interaction.fields.channel): "
        "clinical_interaction__v has no field channel__v",
    ]


def test_wrong_object_type_and_field_type(demo, ctms, crm):
    demo["ctms"]["activity"]["medical_type"] = "medical_activty__v"
    demo["ctms"]["activity"]["fields"]["complete"] = "subject__v"
    _, failed = preflight(demo, ctms, crm)
    assert len(failed) == 3
    assert "(ctms.activity.medical_type): not an object type of crm_activity__v" in failed[1]
    assert "(ctms.activity.fields.complete): is text, expected boolean" in failed[0]
    assert ("object type crm_activity__v.medical_activty__v (ctms.activity.medical_type) is active: not found"
            in failed[2])


def test_an_inactive_medical_activity_type_fails_naming_where_to_activate_it(demo, crm, tmp_path):
    from vault_sandbox.testing import SandboxServer

    with SandboxServer("ctms", tmp_path / "ctms.db", seed="users",
                       inactive_object_types="crm_activity__v.medical_activity__v") as inactive:
        _, failed = preflight(demo, inactive, crm)
    assert failed == [
        "FAIL  ctms  object type crm_activity__v.medical_activity__v (ctms.activity.medical_type) is active: "
        "Medical Activity is inactive: an admin activates it under Admin > Configuration > Objects > Activity > "
        "Object Types"]
    demo["features"]["medical_activities"] = False  # not needed without Medical Activities
    with SandboxServer("ctms", tmp_path / "ctms2.db", seed="users",
                       inactive_object_types="crm_activity__v.medical_activity__v") as inactive:
        assert preflight(demo, inactive, crm)[1] == []


def test_automated_activities_need_activity_update_required_and_monitoring_visit_method(demo, ctms, crm):
    fields = demo["ctms"]["monitoring_event"]["fields"]
    fields["update_required"] = "activity_update_needed__ctms"
    fields["visit_method"] = "channel__ctms"  # a Monitoring Event has no Channel
    _, failed = preflight(demo, ctms, crm)
    assert ("FAIL  ctms  automated activities need Activity Update Required on monitoring_event__ctms: "
            "monitoring_event__ctms has no field activity_update_needed__ctms (Activity Update Required): add it to "
            "every Monitoring Event type used for automated activities, or set features.automated_activities: false"
            ) in failed
    assert any(f.startswith("FAIL  ctms  automated activities need Monitoring Visit Method on monitoring_event__ctms: "
                            "monitoring_event__ctms has no field channel__ctms (Monitoring Visit Method)")
               for f in failed)


def test_picklist_values_are_checked(demo, ctms, crm):
    demo["channel_map"]["phone__v"] = "telephone__v"
    demo["status"]["planned"] = "scheduled__v"
    demo["deletion"]["crm_deleted_status"] = "gone__v"
    _, failed = preflight(demo, ctms, crm)
    assert any("channel_map values on crm.interaction" in f and "telephone__v" in f for f in failed)
    assert any("channel_map values on crm.call" in f and "telephone__v" in f for f in failed)
    assert any("status values on crm.interaction" in f and "scheduled__v" in f for f in failed)
    assert any("deletion statuses on crm.clinical_study" in f and "gone__v" in f for f in failed)


def test_id_param_must_be_unique(demo, ctms, crm):
    demo["crm"]["interaction"]["fields"]["external_id"] = "subject__v"
    _, failed = preflight(demo, ctms, crm)
    assert failed == ["FAIL  crm   field clinical_interaction__v.subject__v (crm.interaction.fields.external_id): "
                      "must be unique to serve as idParam (external id)"]


def test_missing_object_and_identifier(demo, ctms, crm):
    demo["crm"]["clinical_site"]["object"] = "study_site__v"
    demo["identifiers"]["crm_account_field"] = "network_id__c"
    _, failed = preflight(demo, ctms, crm)
    assert any("object study_site__v (crm.clinical_site.object): not found" in f for f in failed)
    assert any("(identifiers.crm_account_field): account__v has no field network_id__c" in f for f in failed)


def test_missing_permissions_are_reported(demo, ctms, crm):
    _, failed = preflight(demo, ctms, crm, crm_user="crmreadonly@sandbox.example")
    assert "FAIL  crm   permissions on clinical_interaction__v (create, edit, read): missing: create, edit" in failed
    assert all("permissions" in f for f in failed)


def test_unreachable_vault_is_one_failure(demo, ctms, crm):
    cfg = parse_connection(demo, "test.yaml")
    checks = run_preflight(cfg, lambda conn_id: VaultClient(ctms.url, "integration@sandbox.example", "nope",
                                                            max_retries=0))
    failed = [c.line() for c in checks if c.failed]
    assert len(checks) == len(failed) == 2  # one per vault; nothing else is tried
    assert failed[0].startswith(
        "FAIL  ctms  connection vault_ctms_demo: VaultAuthenticationError: USERNAME_OR_PASSWORD")
    assert "NOT ready to activate" in report(cfg, checks)


def airflow_env(ctms, crm, tmp_path) -> dict:
    env = dict(os.environ, AIRFLOW_HOME=str(tmp_path / "airflow"))
    for name, server in (("VAULT_CTMS_DEMO", ctms), ("VAULT_CRM_DEMO", crm)):
        env[f"AIRFLOW_CONN_{name}"] = json.dumps({
            "conn_type": "veeva_vault", "host": server.url, "login": "integration@sandbox.example",
            "password": "sandbox", "extra": {"api_version": "v25.2", "read_timeout": 30, "burst_floor": 20},
        })
    return env


def run_cli(args, env):
    return subprocess.run([sys.executable, "-m", "clinical_crm", *args], env=env, capture_output=True, text=True,
                          timeout=180)


def test_cli_with_airflow_connections(ctms, crm, tmp_path, demo):
    env = airflow_env(ctms, crm, tmp_path)
    passed = run_cli(["preflight", str(DEMO)], env)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "0 failed: ready to activate" in passed.stdout
    assert "sandbox\"" not in passed.stdout + passed.stderr  # no password echoed

    demo["ctms"]["person"]["fields"]["email"] = "e_mail__sys"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(demo))
    failed = run_cli(["preflight", str(broken)], env)
    assert failed.returncode == 1
    assert "FAIL  ctms  field person__sys.e_mail__sys (ctms.person.fields.email)" in failed.stdout

    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("name: [unclosed\n")
    assert run_cli(["preflight", str(invalid)], env).returncode == 2


def test_hook_builds_client_and_tests_connection(ctms, monkeypatch):
    from clinical_crm.airflow.hooks import VaultHook

    monkeypatch.setenv("AIRFLOW_CONN_VAULT_HOOK_TEST", json.dumps({
        "conn_type": "veeva_vault", "host": ctms.url, "login": "integration@sandbox.example",
        "password": "sandbox", "extra": {"client_id": "hook-test", "connect_timeout": "3", "burst_floor": 5},
    }))
    hook = VaultHook("vault_hook_test")
    client = hook.get_client()
    assert (client.base_url, client.timeout, client.burst_floor) == (ctms.url, (3.0, 120.0), 5)
    assert client.vault_id == "1001"
    client.close()
    assert hook.test_connection() == (True, "Authenticated to vault 1001 as integration@sandbox.example")
    monkeypatch.setenv("AIRFLOW_CONN_VAULT_HOOK_PREFIXED", json.dumps({
        "conn_type": "veeva_vault", "host": ctms.url.removeprefix("http://"), "schema": "http",
        "login": "integration@sandbox.example", "password": "sandbox",
        "extra": {"extra__veeva_vault__api_version": "v25.1", "extra__veeva_vault__read_timeout": "7"}}))
    prefixed = VaultHook("vault_hook_prefixed").get_client()
    assert (prefixed.base_url, prefixed.api_version, prefixed.timeout[1]) == (ctms.url, "v25.1", 7.0)
    assert prefixed.vault_id == "1001"
    prefixed.close()
    monkeypatch.setenv("AIRFLOW_CONN_VAULT_HOOK_BAD", json.dumps({
        "conn_type": "veeva_vault", "host": ctms.url, "login": "integration@sandbox.example", "password": "nope"}))
    ok, message = VaultHook("vault_hook_bad").test_connection()
    assert not ok and "USERNAME_OR_PASSWORD_INCORRECT" in message


def test_provider_registers_the_connection_type():
    from clinical_crm.airflow.provider import get_provider_info

    info = get_provider_info()
    [conn] = info["connection-types"]
    assert conn["connection-type"] == "veeva_vault"
    assert conn["hook-class-name"] == "clinical_crm.airflow.hooks.VaultHook"
    assert set(conn["conn-fields"]) == {"api_version", "client_id", "connect_timeout", "read_timeout", "burst_floor",
                                        "burst_window_seconds", "call_deadline", "keep_alive_seconds",
                                        "login_spacing_seconds", "maintenance_max_wait"}
    assert info["versions"] == [importlib.metadata.version("clinical-crm-connection")]  # not written twice


def test_the_connection_form_is_declared_not_built_by_the_hook():
    """Airflow 3.2+ reads the form from the provider info; the hook's WTForms methods are deprecated."""
    from airflow.providers_manager import ProvidersManager

    from clinical_crm.airflow.hooks import VaultHook

    assert "get_connection_form_widgets" not in VaultHook.__dict__
    assert "get_ui_field_behaviour" not in VaultHook.__dict__
    manager = ProvidersManager()
    widgets = manager.connection_form_widgets
    assert widgets["extra__veeva_vault__burst_floor"].field["schema"]["title"] == "Burst reserve"
    assert widgets["extra__veeva_vault__api_version"].field["value"] == "v25.2"
    behaviour = manager.field_behaviours["veeva_vault"]
    assert behaviour["hidden_fields"] == ["schema", "port"] and behaviour["relabeling"]["host"] == "Vault URL"


def test_airflow_lists_the_connection_type(tmp_path):
    env = dict(os.environ, AIRFLOW_HOME=str(tmp_path / "airflow"))
    listed = subprocess.run([sys.executable, "-m", "airflow", "providers", "hooks", "-o", "json"], env=env,
                            capture_output=True, text=True, timeout=180)
    hooks = {h["connection_type"]: h for h in json.loads(listed.stdout[listed.stdout.index("["):])}
    assert hooks["veeva_vault"]["class"] == "clinical_crm.airflow.hooks.VaultHook"
    assert hooks["veeva_vault"]["package_name"] == "clinical-crm-connection"


def test_permissions_are_derived_from_what_the_flows_declare(demo_cfg):
    """Reads need read (also on the objects reached through relationship fields), targets read,
    create and edit, deletion marks read and edit, the pre-step edits its source records."""
    from clinical_crm.flows import build_all
    from clinical_crm.preflight import flow_permissions

    class Catalog:  # the metadata of the relationship fields the demo's queries use
        refers = {"person__v": "person__sys", "created_by__v": "user__sys", "study__v": "study__v",
                  "site__v": "site__v", "study_country__v": "study_country__v", "account__v": "account__v"}

        def object(self, name):
            return {"name": name}

        def field(self, object_name, field_name):
            target = self.refers.get(field_name)
            return {"name": field_name, "object": {"name": target}} if target else None

    flows = build_all(demo_cfg)
    ctms = flow_permissions(flows, "ctms", Catalog())
    crm = flow_permissions(flows, "crm", Catalog())
    assert ctms["crm_activity__v"] == {"read", "create", "edit"}  # read, written by crm_to_ctms and the pre-step
    assert ctms["monitoring_event__ctms"] == ctms["study_communication_log__ctms"] == {"read", "edit"}  # flags cleared
    assert ctms["person__sys"] == ctms["user__sys"] == ctms["study_country__v"] == {"read"}  # via relationships
    assert crm["clinical_interaction__v"] == crm["clinical_study__v"] == {"read", "create", "edit"}
    assert crm["account__v"] == crm["call2__v"] == crm["user__sys"] == {"read"}
