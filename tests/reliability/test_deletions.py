"""Deletion marks have the guarantees of upserts (issue 14): a mark the target refuses is not
lost, a run that leaves one behind is not plain success, and every later run re-drives it until
it goes through; re-runs never mark twice."""
from __future__ import annotations

import functools
from datetime import datetime, timedelta, timezone

import pytest

import harness

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture(scope="module")
def small_seed(tmp_path_factory, airflow_db):
    return harness.seed_world(tmp_path_factory.mktemp("seed"), 60)


def subjects(folder) -> dict[str, str]:
    """external id -> subject of every CRM interaction (from the sandbox's SQLite file)."""
    import json

    snap = harness.snapshot(folder / "crm.db")
    rows = [json.loads(r) for r in snap["clinical_interaction__v"]]
    return {r["external_id__v"]: r["subject__v"] for r in rows}


def delete_activities(world, count: int) -> list[dict]:
    from clinical_crm.vault import VaultClient

    with VaultClient(world.ctms.url, harness.USER, harness.PASSWORD) as ctms:
        rows = [r for page in ctms.query("SELECT id, global_id__sys, subject__v FROM crm_activity__v "
                                         "WHERE object_type__vr.api_name__v = 'clinical_activity__v' ORDER BY id")
                for r in page.records][:count]
    for row in rows:
        body = world.ctms.admin.call("DELETE", f"/api/v25.2/vobjects/crm_activity__v/{row['id']}")
        assert body["responseStatus"] == "SUCCESS", body
    return rows


def test_a_refused_deletion_mark_is_redriven_by_a_later_run_whose_window_no_longer_has_it(
        small_seed, tmp_path, monkeypatch):
    from clinical_crm.airflow import hooks
    from clinical_crm.vault.client import VaultClient

    folder = harness.copy_world(small_seed, tmp_path / "w")
    monkeypatch.setattr(hooks, "VaultClient", functools.partial(VaultClient, backoff_initial=0.01))
    with harness.World(folder) as world:
        assert world.run_dag("ctms_to_crm__demo", harness.wide_window()).state == "success"
        deleted = delete_activities(world, 10)
        deleted_at = datetime.now(timezone.utc)
        # every write to CRM races, more often than the client and the task retries re-send
        world.crm.admin.faults(rate=1.0, kinds=["race_condition"])
        failed = world.run_dag("ctms_to_crm__demo", harness.wide_window())
        world.disarm()
        assert failed.state == "failed"  # not a success that silently dropped the marks
        ledger = world.ledger()
        pending = ledger.pending_deletions("demo", "ctms_to_crm", "crm_activity__v")
        assert sorted(p["source_id"] for p in pending) == sorted(r["id"] for r in deleted)
        assert all(p["attempts"] >= 1 for p in pending)
        # the next window starts after the deletions: only the queue still knows them
        later = (deleted_at + timedelta(seconds=1), datetime.now(timezone.utc) + timedelta(minutes=5))
        assert world.run_dag("ctms_to_crm__demo", later).state == "success"
        assert world.run_dag("ctms_to_crm__demo", later).state == "success"  # and a re-run
        assert ledger.pending_deletions("demo", "ctms_to_crm", "crm_activity__v") == []
        counts = ledger.recent_runs("demo", limit=2)[1]["counts"]["crm_activity__v"]
        assert counts["deletions_applied"] == 10, counts
    final = subjects(folder)
    for row in deleted:
        assert final[row["global_id__sys"]] == f"{row['subject__v']} Deleted"  # once, not twice


def test_a_mark_the_target_refuses_for_good_leaves_the_run_partial_and_stays_queued(small_seed, tmp_path):
    """A subject already at the field's maximum length cannot take " Deleted": Vault refuses the
    update (INVALID_DATA). The run says so (state partial), the mark stays pending, and it goes
    through once the subject is shortened."""
    from clinical_crm.vault import VaultClient

    folder = harness.copy_world(small_seed, tmp_path / "w")
    with harness.World(folder) as world:
        assert world.run_dag("ctms_to_crm__demo", harness.wide_window()).state == "success"
        with VaultClient(world.ctms.url, harness.USER, harness.PASSWORD) as ctms:
            row = next(r for page in ctms.query("SELECT id, global_id__sys FROM crm_activity__v WHERE "
                                                "object_type__vr.api_name__v = 'clinical_activity__v' ORDER BY id")
                       for r in page.records)
            assert ctms.update("crm_activity__v", [{"id": row["id"], "subject__v": "x" * 1500}])[0].outcome == "updated"
        assert world.run_dag("ctms_to_crm__demo", harness.wide_window()).state == "success"
        body = world.ctms.admin.call("DELETE", f"/api/v25.2/vobjects/crm_activity__v/{row['id']}")
        assert body["responseStatus"] == "SUCCESS", body
        assert world.run_dag("ctms_to_crm__demo", harness.wide_window()).state == "success"  # the DAG run
        ledger = world.ledger()
        run = ledger.recent_runs("demo", limit=1)[0]
        assert run["state"] == "partial" and "deletion mark" in run["message"], run
        assert run["counts"]["crm_activity__v"]["deletions_failed"] == 1
        [pending] = ledger.pending_deletions("demo", "ctms_to_crm", "crm_activity__v")
        assert pending["source_id"] == row["id"]
        # the engineer shortens the subject in CRM; the next run applies the mark
        with VaultClient(world.crm.url, harness.USER, harness.PASSWORD) as crm:
            [target] = [r for page in crm.query(
                f"SELECT id FROM clinical_interaction__v WHERE external_id__v = '{row['global_id__sys']}'")
                for r in page.records]
            assert crm.update("clinical_interaction__v",
                              [{"id": target["id"], "subject__v": "Visit"}])[0].outcome == "updated"
        later = (datetime.now(timezone.utc), datetime.now(timezone.utc) + timedelta(minutes=5))
        assert world.run_dag("ctms_to_crm__demo", later).state == "success"
        assert ledger.recent_runs("demo", limit=1)[0]["state"] == "success"
    assert subjects(folder)[row["global_id__sys"]] == "Visit Deleted"
