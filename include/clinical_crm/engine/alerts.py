"""What a connection alerts on, as texts: no Airflow, no sending (airflow/notifier.py sends them).

With an `alerts:` section in the connection file (off unless set):

- `run_failed`: a task of a run failed for good (which task, the window, the reason, a link);
- `quarantine_new`: one run quarantined more new records than `quarantine_threshold`;
- `quarantine_age`: records held longer than `quarantine_max_age_days` (at most once a day per
  connection and direction: `due`);
- `lag`: no successful window end within `max_lag_minutes`, checked when a run begins.

Alerts name the connection, the DAG, the run, the window, counts, rule names and record ids:
never a person's name or email, never a credential (an email address in an error's text is
blanked, see `scrub`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta


EMAIL = re.compile(r"[^\s@<>()'\"]+@[^\s@<>()'\"]+")
MAX_REASON = 2000  # characters of an error's text in an alert
LISTED = 10  # record ids an alert lists
AGE_REPEAT = timedelta(days=1)  # an open-quarantine alert is repeated at most this often


@dataclass(frozen=True)
class Alert:
    kind: str  # run_failed | quarantine_new | quarantine_age | lag
    subject: str
    body: str


def scrub(text: str) -> str:
    """An error's text as an alert may carry it: email addresses blanked, length bounded."""
    text = EMAIL.sub("<email address>", str(text))
    return text if len(text) <= MAX_REASON else text[:MAX_REASON] + " ..."


def _alert(kind: str, cfg, dag_id: str, headline: str, lines: list[str], link: str) -> Alert:
    body = "\n".join([headline, "", f"Connection: {cfg.name}", f"DAG: {dag_id}", *lines, f"Airflow: {link}",
                      "", "Sent by the Clinical CRM connection (alerts: in the connection file)."])
    return Alert(kind, f"[clinical-crm] {dag_id}: {headline}", body)


def run_failed(cfg, dag_id: str, run_id: str, task_id: str, window: tuple[str, str] | None, error: str,
               link: str) -> Alert:
    span = f"{window[0]} .. {window[1]}" if window else "not decided (the run failed before its window was set)"
    return _alert("run_failed", cfg, dag_id, f"run failed in task {task_id}",
                  [f"Run: {run_id}", f"Window: {span}", f"Task: {task_id}", f"Reason: {scrub(error)}"], link)


def quarantine_new(cfg, dag_id: str, summary: dict, link: str) -> Alert | None:
    """`summary`: the run's DQ summary (engine/runner.validate)."""
    threshold = cfg.alerts.quarantine_threshold
    new = summary.get("new_quarantined", 0)
    if threshold is None or new <= threshold:
        return None
    rules = ", ".join(f"{rule}: {count}" for rule, count in sorted(summary.get("reasons", {}).items()))
    return _alert("quarantine_new", cfg, dag_id, f"{new} records newly quarantined (threshold {threshold})",
                  [f"Run: {summary['dag_run_id']}", f"Window: {summary['window_start']} .. {summary['window_end']}",
                   f"Object: {summary['object']}", f"Failing rows per rule: {rules}",
                   f"Quarantined records (CSV): {summary.get('quarantine_csv')}"], link)


def quarantine_age(cfg, dag_id: str, direction: str, open_rows: list[dict], now: datetime, link: str) -> Alert | None:
    """`open_rows`: the ledger's open quarantine of the connection (first_seen as ISO text)."""
    days = cfg.alerts.quarantine_max_age_days
    if days is None:
        return None
    limit = now - timedelta(days=days)
    old = [r for r in open_rows if r["direction"] == direction and datetime.fromisoformat(r["first_seen"]) < limit]
    if not old:
        return None
    listed = [f"  {r['object']} {r['source_id']} (since {r['first_seen']}): {'; '.join(r['reasons'])}"
              for r in old[:LISTED]]
    return _alert("quarantine_age", cfg, dag_id, f"{len(old)} records quarantined for more than {days:g} days",
                  ["Oldest first:", *listed] + ([f"  ... and {len(old) - LISTED} more"] if len(old) > LISTED else []),
                  link)


def lag(cfg, dag_id: str, last_success_end: datetime | None, now: datetime, link: str) -> Alert | None:
    minutes = cfg.alerts.max_lag_minutes
    if minutes is None or last_success_end is None or now - last_success_end <= timedelta(minutes=minutes):
        return None
    behind = int((now - last_success_end).total_seconds() // 60)
    return _alert("lag", cfg, dag_id, f"no successful window for {behind} minutes (limit {minutes})",
                  [f"Last successful window end: {last_success_end.isoformat()}",
                   "Every run since has failed or none has run: see the DAG's runs."], link)


def due(connection: str, key: str, now: datetime, every: timedelta = AGE_REPEAT, ledger=None) -> bool:
    """True (and remembered) when alert `key` was not sent within `every`: a repeating condition
    (an old quarantine) alerts once a day, not every hour. State: <reports>/<connection>/alerts_sent.json
    under the storage root; read, changed and written under the ledger's lock `alerts:<connection>`,
    so two workers finishing at once send it once."""
    from clinical_crm.engine import storage

    if ledger is None:
        from clinical_crm.engine.ledger import Ledger

        ledger = Ledger()
    path = storage.reports(connection, "alerts_sent.json")
    with ledger.exclusive(f"alerts:{connection}"):
        sent = json.loads(path.read_text()) if path.exists() else {}
        if key in sent and now - datetime.fromisoformat(sent[key]) < every:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**sent, key: now.isoformat()}, indent=2))
    return True
