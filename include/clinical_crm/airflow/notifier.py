"""Sends a connection's alerts (clinical_crm.engine.alerts) with Airflow's notifier mechanism.

- `RunFailedNotifier`: a `BaseNotifier`, the `on_failure_callback` of every task of a DAG whose
  connection file has `alerts:` (`with_alerts` adds it to the DAG's default_args);
- `check_begin` (the begin task: lag) and `check_finish` (the finish task: newly quarantined
  records of the run, old open quarantine) send what is due;
- `send`: the SMTP provider's `SmtpNotifier` (Airflow connection `alerts.smtp_conn_id`) and/or
  the Slack provider's `SlackWebhookNotifier` (`alerts.slack_webhook_conn_id`), with the texts
  taken as they are (they are not Jinja templates).

Links point at the run in the Airflow UI under `[api] base_url`. A failed send is logged, never
fails the task. The providers are imported only when an alert is sent (DAG parsing stays fast).
"""
from __future__ import annotations

import html
import logging
from datetime import datetime, timezone
from urllib.parse import quote

from airflow.sdk import BaseNotifier, conf

from clinical_crm.engine import alerts

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://localhost:8080"


def run_link(dag_id: str, run_id: str, task_id: str | None = None) -> str:
    """The run (or one task of it) in the Airflow UI."""
    base = (conf.get("api", "base_url", fallback=None) or DEFAULT_BASE_URL).rstrip("/")
    link = f"{base}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
    return f"{link}/tasks/{quote(task_id, safe='')}" if task_id else link


def _plain(notifier_class):
    """A provider's notifier whose texts are taken as they are (alert texts are not Jinja templates)."""
    return type(f"Plain{notifier_class.__name__}", (notifier_class,), {"template_fields": ()})


def _notifiers(settings, alert: alerts.Alert):
    """(Airflow connection id, notifier) of every channel the alerts section sets."""
    if settings.smtp_conn_id:
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        yield settings.smtp_conn_id, _plain(SmtpNotifier)(
            to=list(settings.to), from_email=settings.from_, subject=alert.subject,
            html_content=f"<pre>{html.escape(alert.body)}</pre>", smtp_conn_id=settings.smtp_conn_id)
    if settings.slack_webhook_conn_id:
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

        yield settings.slack_webhook_conn_id, _plain(SlackWebhookNotifier)(
            slack_webhook_conn_id=settings.slack_webhook_conn_id, text=f"{alert.subject}\n\n{alert.body}")


def send(cfg, alert: alerts.Alert, context: dict | None = None) -> None:
    """Send one alert through every channel of `alerts:`; a failure to send is logged, not raised."""
    for conn_id, notifier in _notifiers(cfg.alerts, alert):
        try:
            notifier(dict(context or {}))
            log.warning("alert sent (%s) through %s: %s", alert.kind, conn_id, alert.subject)
        except Exception:  # an alert must not fail the run it reports on
            log.exception("alert %s could not be sent through %s", alert.kind, conn_id)


class RunFailedNotifier(BaseNotifier):
    """on_failure_callback: a task failed for good; tells which task, the window, the reason and
    where the run is. The connection file is re-read: alerts switched off since parsing send nothing."""

    def __init__(self, source: str):
        super().__init__()
        self.source = source

    def notify(self, context) -> None:
        from clinical_crm import config

        cfg = config.load_connection(self.source)
        if cfg.alerts is None:
            return
        ti = context["ti"]
        run = ti.xcom_pull(task_ids="begin") if ti.task_id != "begin" else None
        window = (run["window_start"], run["window_end"]) if run else None
        error = context.get("exception")
        reason = f"{type(error).__name__}: {error}" if error is not None else "unknown (see the task log)"
        send(cfg, alerts.run_failed(cfg, ti.dag_id, context["run_id"], ti.task_id, window, reason,
                                    run_link(ti.dag_id, context["run_id"], ti.task_id)), context)


def with_alerts(default_args: dict, cfg) -> dict:
    """The DAG's default_args, with the failure notifier when the connection file has alerts."""
    if cfg.alerts is None:
        return default_args
    return {**default_args, "on_failure_callback": RunFailedNotifier(str(cfg.source_file))}


def check_begin(cfg, ctx, context: dict) -> None:
    """Lag: the end of the last successful window is older than alerts.max_lag_minutes."""
    from clinical_crm.engine.ledger import Ledger

    if cfg.alerts is None or not ctx.active:
        return
    dag_id = context["dag"].dag_id
    last = Ledger().last_success_end(cfg.name, ctx.direction) or cfg.schedule.start_date
    alert = alerts.lag(cfg, dag_id, last, datetime.now(timezone.utc), run_link(dag_id, ctx.dag_run_id))
    if alert:
        send(cfg, alert, context)


def check_finish(cfg, ctx, context: dict) -> None:
    """After a successful run: newly quarantined records above the threshold, and an open
    quarantine older than alerts.quarantine_max_age_days (once a day)."""
    import json

    from clinical_crm.engine.ledger import Ledger
    from clinical_crm.engine.quarantine_report import run_file

    if cfg.alerts is None or not ctx.active:
        return
    dag_id = context["dag"].dag_id
    link = run_link(dag_id, ctx.dag_run_id)
    summary_file = run_file(cfg.name, ctx.direction, ctx.dag_run_id, ".json")
    due = []
    if summary_file.exists():
        due.append(alerts.quarantine_new(cfg, dag_id, json.loads(summary_file.read_text()), link))
    now = datetime.now(timezone.utc)
    if cfg.alerts.quarantine_max_age_days is not None:
        old = alerts.quarantine_age(cfg, dag_id, ctx.direction, Ledger().open_quarantine(cfg.name), now, link)
        due.append(old if old and alerts.due(cfg.name, f"quarantine_age.{ctx.direction}", now) else None)
    for alert in filter(None, due):
        send(cfg, alert, context)
