"""The data engineers' page inside the Airflow UI (an Airflow 3 plugin): the operations console.

A small FastAPI app, mounted by the api-server under ``/clinical-crm``, renders server-side HTML
from the sync ledger's read API. This module owns, per part of the page:

- counts: a run's row and its per-object breakdown from the same numbers; "Loaded" is what was
  written to the target (created + updated), "Unchanged" stands apart (the ledger's `loaded`
  includes it); the pre-step's writes to the SOURCE vault have a column of their own
  (engine.run_counts), never in Loaded;
- data quality: pass/fail and the Data Docs pages of the run's own `dq_summaries` rows (their
  objects and report site only, never another direction's suites of the same DAG run id);
- health: per connection the last successful window end and lag per direction, the last run's
  state, the open quarantine, and an SVG chart of the last runs (written / quarantined / failed
  bars, duration line);
- Airflow links: each run links to its DAG run and task logs in the Airflow UI;
- missed and failed windows: a gap before the next window of the same direction, and failed
  runs, are marked with "Backfill this window", which creates an Airflow backfill through
  Airflow's REST API as the current user;
- quarantine triage: filters (object, reason text, age), paging in SQL, a streamed CSV export,
  the actions "retry in the next run" / "ignore, with a reason", per record or for all the
  records a filter shows in one action (recorded per record), with the Airflow user; each
  record links to its page in its source vault's UI (`VAULT_RECORD_URL`, from the Airflow
  connection's host);
- progress: a running run's row shows the latest progress of its long steps (engine.progress).

Actions and backfills need Airflow's edit permission on the DAG (`<direction>__<connection>`),
asked of Airflow's auth manager; their POST forms are accepted from the page's own origin only
(CSRF). The Data Docs HTML is served from the reports folder of the storage root
(``settings.reports_url()``: a local folder, or object storage read through ObjectStoragePath's
filesystem); paths outside it are refused. Every route requires an authenticated Airflow user (the api-server's
session cookie or bearer token), like Airflow's own API. The plugin also declares an external
view, so the page is listed in the UI's "Browse" menu and shown inside the Airflow UI.
"""
from __future__ import annotations

import csv
import functools
import glob
import io
import logging
import posixpath
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from airflow.plugins_manager import AirflowPlugin

from clinical_crm import settings
from clinical_crm.airflow import naming
from clinical_crm.airflow.naming import dag_id
from clinical_crm.times import duration

URL_PREFIX = "/clinical-crm"
REPORT_CSP = "sandbox allow-scripts allow-forms"
COUNT_COLUMNS = ("extracted", "loaded", "unchanged", "quarantined", "failed")
WRITTEN = ("created", "updated")  # "loaded" on the page: records written to the target
PAGE_SIZE = 50  # quarantine rows per triage page
OVERVIEW_QUARANTINE = 10  # the oldest open quarantine rows on the overview
CSV_COLUMNS = ("id", "direction", "object", "source_id", "reasons", "first_seen", "last_seen")
TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
)


def _ledger():
    from clinical_crm.engine.ledger import Ledger

    return Ledger(settings.ledger_url())


def timestamp(value: str | None) -> str:
    """ISO timestamps of the ledger (UTC) as `YYYY-MM-DD HH:MM:SS`."""
    if not value:
        return ""
    text = str(value).replace("T", " ")
    return text[:19] if text.endswith("+00:00") or text.endswith("Z") else text


def _moment(value: str | None) -> datetime | None:
    if not value:
        return None
    moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


TEMPLATES.filters["timestamp"] = timestamp
TEMPLATES.filters["duration"] = duration  # clinical_crm.times: the task log and the page say it alike


# ---------------------------------------------------------------- counts


def object_row(counts: dict) -> dict[str, int]:
    """One object's counts in the page's columns: loaded = written (created + updated)."""
    row = {name: int(counts.get(name) or 0) for name in COUNT_COLUMNS}
    if any(key in counts for key in WRITTEN):
        row["loaded"] = sum(int(counts.get(key) or 0) for key in WRITTEN)
    else:  # counts without the split: the ledger's loaded includes the unchanged records
        row["loaded"] = max(row["loaded"] - row["unchanged"], 0)
    return row


def pre_step_counts(counts: dict) -> dict:
    """What the pre-step wrote to the SOURCE vault (e.g. the Clinical Activities a ctms_to_crm
    run creates in CTMS), apart from the target's Loaded: {"written": created + updated,
    "failed", "objects": {source object: its non-zero counts}}; written 0 and no objects when
    the run had no pre-step."""
    from clinical_crm.engine import run_counts as where

    objects = {obj: {k: v for k, v in values.items() if v and k != "loaded"}
               for obj, values in sorted(where.split(counts)[1].items())}
    written = sum(int(c.get(k) or 0) for c in objects.values() for k in WRITTEN)
    failed = sum(int(c.get("failed") or 0) for c in objects.values())
    return {"written": written, "failed": failed, "objects": objects}


def run_counts(counts: dict) -> tuple[dict[str, int], dict[str, dict]]:
    """A run's row (totals) and its per-object breakdown, computed from the same numbers so they
    agree: {object: {"columns": page columns, "other": the object's other non-zero counts}}. The
    pre-step's writes to the source vault are not in them (`pre_step_counts`)."""
    from clinical_crm.engine import run_counts as where

    counts = where.split(counts)[0]
    nested = {key: value for key, value in (counts or {}).items() if isinstance(value, dict)}
    flat = {key: value for key, value in (counts or {}).items() if not isinstance(value, dict)}
    if flat and nested:
        nested["(run)"] = flat
    objects = {name: {"columns": object_row(values),
                      "other": {k: v for k, v in values.items()
                                if k not in COUNT_COLUMNS and k not in WRITTEN and v}}
               for name, values in nested.items()}
    rows = [o["columns"] for o in objects.values()] or [object_row(flat)]
    totals = {name: sum(row[name] for row in rows) for name in COUNT_COLUMNS}
    return totals, objects


def progress_lines(run: dict) -> list[dict]:
    """The latest progress of a running run's long steps (engine.progress), as lines for its row;
    for a failed run, where its unfinished steps stopped. None for other runs. A connection's run
    or a reconciliation's (both rows carry `state` and `progress`)."""
    from clinical_crm.engine.progress import line

    if run["state"] not in ("running", "failed"):
        return []
    steps = run.get("progress") or {}
    shown = []
    for step, figures in steps.items():
        if not isinstance(figures, dict) or "done" not in figures:
            continue
        if run["state"] == "failed" and figures.get("state") == "done":
            continue
        shown.append({"step": step, "done": figures.get("done"), "total": figures.get("total"),
                      "state": figures.get("state"), "burst_remaining": figures.get("burst_remaining"),
                      "text": line(figures)})
    return shown


# ---------------------------------------------------------------- data quality


def _reports():
    """The reports folder of the storage root (engine/storage.py): a local folder or object storage."""
    from clinical_crm.engine import storage

    return storage.Tree(settings.reports_url())


def report_file(path: str | None, tree=None) -> str | None:
    """A Data Docs file (a folder means its index.html), by its name relative to the reports
    folder, if it lies inside it; `path`: relative, or absolute (a local path or a URL)."""
    if not path:
        return None
    tree = tree or _reports()
    rel = tree.inside(path)
    if rel is None:
        return None
    if tree.is_dir(rel):
        rel = f"{rel}/index.html" if rel else "index.html"
        rel = tree.inside(rel)  # a link inside may leave the folder
        if rel is None:
            return None
    return rel if rel and tree.is_file(rel) else None


def report_link(path: str | None, tree=None) -> str | None:
    """Relative URL (served by this app) of a Data Docs file, or None when it is not servable."""
    target = report_file(str(path) if path else None, tree)
    if target is None:
        return None
    return "reports/" + quote(target)


def validation_pages(site_index: str | None, run_name: str = "*", tree=None) -> dict[str, list[dict]]:
    """The validation result pages of a Data Docs site (its index.html, relative to the reports
    folder) by run name (the DAG run id); those of one run with `run_name` (looked up under each
    suite, not a listing of every run's folder).

    Great Expectations lays them out as validations/<suite path>/<run name>/<time>/<batch>.html,
    where our suite names are <connection>.<object>.<suite>.
    """
    pages: dict[str, list[dict]] = {}
    if site_index is None:
        return pages
    tree = tree or _reports()
    validations = posixpath.join(posixpath.dirname(site_index), "validations")
    pattern = f"*/*/*/{glob.escape(run_name) if run_name != '*' else '*'}/*/*.html"
    for page in tree.glob(f"{validations}/{pattern}"):
        connection, object_name, suite = page[len(validations) + 1:].split("/")[:3]
        run_name = page.rsplit("/", 3)[-3]
        link = report_link(page, tree)
        if link:
            pages.setdefault(run_name, []).append({"connection": connection, "object": object_name,
                                                   "label": f"{object_name} / {suite}", "link": link})
    return pages


def data_quality(ledger, run: dict, pages_by_site: dict) -> dict:
    """Pass/fail of a run's quality checks, with links to the Data Docs pages of the run's own
    summaries: the same DAG run id in the other direction validates other objects in the same
    connection's site, and those pages are not this run's."""
    summaries = ledger.dq_summaries(run["run_id"])
    passed = all(s["success"] for s in summaries) if summaries else None
    tree = pages_by_site.get("tree") or pages_by_site.setdefault("tree", _reports())  # one per request
    site = next((found for found in (report_file(s.get("report_path"), tree) for s in summaries) if found), None)
    # a local site is looked up per run (a glob under each suite); an object store lists every
    # page under the prefix for any pattern, so a remote site is listed once per request
    key = (site, run["dag_run_id"] if tree.local else "*")
    if site is not None and key not in pages_by_site:
        pages_by_site[key] = validation_pages(site, key[1], tree)
    objects = {s["object"] for s in summaries}
    pages = [p for p in pages_by_site.get(key, {}).get(run["dag_run_id"], [])
             if p["connection"] == run["connection"] and p["object"] in objects]
    failing = sum(int(s.get("failing_rows") or 0) for s in summaries)
    return {"passed": passed, "link": report_link(site, tree) if site else None, "pages": pages,
            "failing_rows": failing, "objects": summaries}


# ---------------------------------------------------------------- health, chart, gaps, links


def airflow_links(ui_base: str, run: dict) -> dict:
    """The run's DAG run and task pages in the Airflow UI (their logs), with the task ids the DAG
    factory gives the run's flow (built from its connection file, when the file is still there)."""
    dag = quote(dag_id(run["direction"], run["connection"]), safe="")
    base = f"{ui_base}/dags/{dag}/runs/{quote(run['dag_run_id'], safe='')}"
    tasks = naming.task_ids(_flow_of(run["connection"], run["direction"], int(time.monotonic() // 60)))
    return {"run": base, "tasks": [{"task_id": task, "link": f"{base}/tasks/{task}"} for task in tasks]}


@functools.lru_cache(maxsize=64)
def _flow_of(connection: str, direction: str, minute: int):
    """The flow of one connection file, by name; None when it is gone or does not load. Kept a
    minute (`minute`), so a page of many runs reads the files once."""
    from clinical_crm import config
    from clinical_crm.flows import build

    try:
        cfg = next((c for c in config.load_connections() if c.name == connection), None)
        return build(direction, cfg) if cfg is not None else None
    except Exception:  # a page about history must still show when a file is broken or removed
        return None


def health(ledger, connection: dict, now: datetime) -> dict:
    """A connection's health line: per direction the last successful window end and the lag
    since, the last run's state, the open quarantine."""
    ends = ledger.last_success_ends(connection["connection"])
    return {"last_run": connection["last_run"], "open_quarantine": connection["open_quarantine"],
            "directions": [{"direction": direction, "last_success_end": end,
                            "lag": (now - moment).total_seconds() if (moment := _moment(end)) else None}
                           for direction, end in sorted(ends.items())]}


def run_chart(runs: list[dict], width: int = 1000, height: int = 180) -> dict:
    """Geometry of an SVG chart of runs, oldest left: a stacked bar per run (written,
    quarantined, failed) on the left axis, the run's duration as a line on the right axis.
    Bars are labelled with direction and window end as often as the labels fit (~80 px each)."""
    runs = list(reversed(runs))
    left, right, top, bottom = 44, 64, 12, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / max(len(runs), 1)
    label_every = max(1, -(-80 // int(slot)))  # ceil(80 / slot)
    most = max([sum(r["totals"][k] for k in ("loaded", "quarantined", "failed")) for r in runs] + [1])
    durations = [r["duration"] for r in runs]
    longest = max([d for d in durations if d is not None] + [1])
    bars, points = [], []
    for index, run in enumerate(runs):
        x = left + index * slot + slot * 0.2
        y = top + plot_h
        segments = []
        for key in ("loaded", "quarantined", "failed"):
            value = run["totals"][key]
            h = plot_h * value / most
            y -= h
            segments.append({"key": key, "value": value, "y": round(y, 1), "h": round(h, 1)})
        bars.append({"x": round(x, 1), "w": round(slot * 0.6, 1), "segments": segments, "state": run["state"],
                     "label": timestamp(run["window_end"])[5:16] if index % label_every == 0 else "",
                     "direction": run["direction"].split("_to_")[-1],
                     "title": f"{run['direction']} {run['dag_run_id']}: written {run['totals']['loaded']}, "
                              f"quarantined {run['totals']['quarantined']}, failed {run['totals']['failed']}, "
                              f"{run['state']}, {duration(run['duration'])}"})
        if run["duration"] is not None:
            points.append(f"{x + slot * 0.3:.1f},{top + plot_h - plot_h * run['duration'] / longest:.1f}")
    return {"width": width, "height": height, "left": left, "right": width - right, "top": top,
            "bottom": top + plot_h, "bars": bars, "points": " ".join(points), "most": most,
            "longest": duration(longest), "runs": len(runs)}


def mark_gaps(runs: list[dict]) -> list[dict]:
    """Rows for the runs list, newest first: each run, and before it (above) a missed window
    when its window starts after the end of the previous window of the same direction."""
    previous_end: dict[str, str] = {}
    gap_before: dict[int, dict] = {}
    for run in sorted(runs, key=lambda r: (r["direction"], r["window_start"] or "")):
        start, end = _moment(run["window_start"]), _moment(run["window_end"])
        before = _moment(previous_end.get(run["direction"]))
        if before and start and start > before:
            gap_before[run["run_id"]] = {"direction": run["direction"], "connection": run["connection"],
                                         "window_start": before.isoformat(), "window_end": start.isoformat()}
        if end and (before is None or end > before):
            previous_end[run["direction"]] = end.isoformat()
    rows = []
    for run in runs:
        if run["run_id"] in gap_before:
            rows.append({"kind": "gap", **gap_before[run["run_id"]]})
        rows.append({"kind": "run", **run})
    return rows


# ---------------------------------------------------------------- links to the vaults' UI

# [U] Vault's UI shows an object record at `{host}/ui/#object/{object}/{id}` (the vault's base
# URL, the object's API name, the record id): a reasonable default, NOT confirmed against Vault's
# documentation (see REFERENCE.md). $CLINICAL_CRM_VAULT_RECORD_URL replaces it, with the same
# placeholders, should a vault show records elsewhere.
VAULT_RECORD_URL = "{host}/ui/#object/{object}/{id}"


def vault_record_url(host: str | None, object_name: str, record_id: str) -> str | None:
    """The record's page in its vault's UI (None without a host)."""
    import os

    if not host or not object_name or not record_id:
        return None
    pattern = os.environ.get("CLINICAL_CRM_VAULT_RECORD_URL") or VAULT_RECORD_URL
    return pattern.format(host=host.rstrip("/"), object=quote(object_name, safe=""), id=quote(record_id, safe=""))


def source_vault_hosts(connection: str) -> dict[str, str]:
    """{direction: the base URL of its SOURCE vault} of a connection: the host of the Airflow
    connection the connection file names for that side (ctms_conn_id / crm_conn_id), where the
    quarantined records live. Directions whose Airflow connection is missing are left out."""
    return dict(_source_vault_hosts(connection, int(time.monotonic() // 60)))


@functools.lru_cache(maxsize=64)
def _source_vault_hosts(connection: str, minute: int) -> tuple[tuple[str, str], ...]:
    """Kept a minute (`minute`): a page of many rows asks Airflow for each connection once."""
    from clinical_crm import config

    try:
        cfg = next((c for c in config.load_connections() if c.name == connection), None)
    except Exception:  # a broken connection file: no links, the page still shows
        return ()
    if cfg is None:
        return ()
    from clinical_crm.airflow.hooks import _base_url

    hosts = []
    for direction, side in (("ctms_to_crm", "ctms"), ("crm_to_ctms", "crm")):
        try:
            from airflow.sdk import BaseHook

            conn = BaseHook.get_connection(getattr(cfg, f"{side}_conn_id"))
        except Exception:  # not defined (yet) in Airflow: no link
            continue
        if conn.host:
            hosts.append((direction, _base_url(conn.host, conn.port, conn.schema)))
    return tuple(hosts)


def vault_links(connection: str, held: list[dict]) -> dict[int, str]:
    """{quarantine row id: the record's page in its source vault's UI}."""
    hosts = source_vault_hosts(connection) if held else {}
    links = {}
    for h in held:
        url = vault_record_url(hosts.get(h["direction"]), h["object"], h["source_id"])
        if url:
            links[h["id"]] = url
    return links


# ---------------------------------------------------------------- users, permissions, forms


def no_login_user() -> Any:
    """The user of an app built without Airflow's login (tests of the app on its own): none."""
    return None


def may_edit_dag(user, dag: str, runs: bool = False) -> bool:
    """Whether Airflow's auth manager lets this user edit the DAG (what quarantine actions need)
    or, with `runs`, create its DAG runs (what Airflow's backfill API itself checks)."""
    if user is None:
        return False
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    if runs:
        return get_auth_manager().is_authorized_dag(method="POST", access_entity=DagAccessEntity.RUN,
                                                    details=DagDetails(id=dag), user=user)
    return get_auth_manager().is_authorized_dag(method="PUT", details=DagDetails(id=dag), user=user)


def editable_directions(user, connection: str, held: list[dict]) -> set[str]:
    """The directions of these quarantine rows whose DAG the user may edit (their actions shown)."""
    return {d for d in {h["direction"] for h in held} if may_edit_dag(user, dag_id(d, connection))}


def require_edit(user, dag: str, runs: bool = False) -> None:
    if not may_edit_dag(user, dag, runs):
        raise HTTPException(status_code=403, detail=f"editing DAG {dag} is not allowed for this user")


def same_origin(request: Request) -> None:
    """CSRF guard of the POST forms: the browser's Origin (or Referer) must be this server, as
    the browser addressed it (Host, or X-Forwarded-Host behind a proxy that rewrites Host; a
    cross-site form cannot set either)."""
    source = request.headers.get("origin") or request.headers.get("referer") or ""
    hosts = {request.headers.get(name, "").lower() for name in ("host", "x-forwarded-host")} - {""}
    if urlsplit(source).netloc.lower() not in hosts:
        raise HTTPException(status_code=403, detail="form posted from another origin")


def ui_base(request: Request) -> str:
    """The Airflow UI's base path: this app's mount path without its prefix."""
    return request.scope.get("root_path", "").removesuffix(URL_PREFIX)


def airflow_token(request: Request) -> str | None:
    """The user's Airflow token (bearer header, else the UI's session cookie), to call Airflow's
    REST API as that user."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:]
    from airflow.api_fastapi.core_api.security import COOKIE_NAME_JWT_TOKEN

    return request.cookies.get(COOKIE_NAME_JWT_TOKEN)


def create_backfill(request: Request, dag: str, window_start: datetime, window_end: datetime):
    """POST /api/v2/backfills on this api-server as the current user; Airflow's answer."""
    import requests

    url = f"{request.url.scheme}://{request.url.netloc}{ui_base(request)}/api/v2/backfills"
    body: dict[str, Any] = {"dag_id": dag, "from_date": window_start.isoformat(), "to_date": window_end.isoformat(),
                            "reprocess_behavior": "failed", "max_active_runs": 1, "run_backwards": False,
                            "dag_run_conf": {}}
    token = airflow_token(request)
    return requests.post(url, json=body, timeout=60,
                         headers={"Authorization": f"Bearer {token}"} if token else {})


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: vault data starting with = + - @ is not a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


# ---------------------------------------------------------------- rendering


def render(template: str, status_code: int = 200, **context) -> HTMLResponse:
    html = TEMPLATES.get_template(template).render(count_columns=COUNT_COLUMNS, **context)
    return HTMLResponse(html, status_code=status_code)


def ledger_unavailable(request: Request, error: SQLAlchemyError) -> HTMLResponse:
    """The ledger's database cannot be read: say which one (without its password) and why."""
    url = make_url(settings.ledger_url()).render_as_string(hide_password=True)
    return render("unavailable.html", status_code=503, connections=[], ledger_url=url,
                  error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


def age_days(value: str | None) -> int | None:
    """The triage filter's age (days, 0 to 3650); blank (the browser sends the empty field) is
    no filter."""
    if not value:
        return None
    days = int(value)
    if days > 3650:
        raise HTTPException(status_code=422, detail="min_age_days: at most 3650")
    return days


def back_to(path: str, **params) -> RedirectResponse:
    """After a POST, back to a page of this app (relative, so it stays under the mount)."""
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return RedirectResponse(f"{path}?{query}" if query else path, status_code=303)


def create_app(require_airflow_login: bool = True) -> FastAPI:
    """The page's app; `require_airflow_login=False` only for tests of the app on its own."""
    dependencies = []
    current_user: Callable[..., Any] = no_login_user
    if require_airflow_login:
        from airflow.api_fastapi.core_api.security import get_user, requires_authenticated

        dependencies.append(Depends(requires_authenticated()))
        current_user = get_user
    user_dependency = Depends(current_user)
    app = FastAPI(
        title="Clinical CRM connection: data engineers' page",
        dependencies=dependencies,
        docs_url=None, redoc_url=None, openapi_url=None,
        # a plain function: Starlette runs it in a thread (FastAPI's annotation names coroutines only)
        exception_handlers={SQLAlchemyError: ledger_unavailable},  # type: ignore[dict-item]
    )

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request, limit: Annotated[int, Query(ge=1, le=200)] = 20,
                 notice: Annotated[str | None, Query(max_length=300)] = None,
                 user: Any = user_dependency) -> HTMLResponse:
        ledger = _ledger()
        now = datetime.now(timezone.utc)
        sections = []
        pages_by_site: dict = {}  # each run's Data Docs pages looked up once per request
        for connection in ledger.connections():
            name = connection["connection"]
            runs = []
            for run in ledger.recent_runs(name, limit=limit):
                totals, objects = run_counts(run.get("counts"))
                started, ended = _moment(run["started_at"]), _moment(run["ended_at"])
                runs.append({**run, "totals": totals, "objects": objects,
                             "pre_step": pre_step_counts(run.get("counts")),
                             "source_side": run["direction"].split("_to_")[0],
                             "progress_lines": progress_lines(run),
                             "duration": (ended - started).total_seconds() if started and ended else None,
                             "dq": data_quality(ledger, run, pages_by_site),
                             "airflow": airflow_links(ui_base(request), run)})
            sections.append({"name": name, "rows": mark_gaps(runs), "chart": run_chart(runs),
                             "health": health(ledger, connection, now),
                             "may_backfill": {d for d in {r["direction"] for r in runs}
                                              if may_edit_dag(user, dag_id(d, name), runs=True)},
                             "quarantine": (held := ledger.quarantine_page(name, limit=OVERVIEW_QUARANTINE)),
                             "vault_links": vault_links(name, held),
                             "reconcile": [r | {"progress_lines": progress_lines(r)}
                                           for r in ledger.reconcile_runs(name, limit=1)],
                             "drift": ledger.drift(name, limit=OVERVIEW_QUARANTINE)})
        return render("overview.html", sections=sections, connections=[s["name"] for s in sections],
                      notice=notice)

    @app.get("/quarantine", response_class=HTMLResponse)
    def quarantine(connection: Annotated[str, Query(min_length=1, max_length=100)],
                   object_name: Annotated[str | None, Query(alias="object", max_length=100)] = None,
                   rule: Annotated[str | None, Query(max_length=200)] = None,
                   min_age: Annotated[str | None, Query(alias="min_age_days", max_length=4,
                                                        pattern="^[0-9]*$")] = None,
                   page: Annotated[int, Query(ge=1)] = 1,
                   notice: Annotated[str | None, Query(max_length=300)] = None,
                   user: Any = user_dependency) -> HTMLResponse:
        ledger = _ledger()
        min_age_days = age_days(min_age)
        filters = {"object_name": object_name or None, "rule": rule or None, "min_age_days": min_age_days or None}
        total = ledger.count_quarantine(connection, **filters)
        rows = ledger.quarantine_page(connection, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE, **filters)
        query = {"connection": connection, "object": object_name or "", "rule": rule or "",
                 "min_age_days": min_age_days or ""}
        directions = ledger.quarantine_directions(connection, **filters) if total else set()
        return render("quarantine.html", connections=[c["connection"] for c in ledger.connections()],
                      connection=connection, rows=rows, total=total, page=page, page_size=PAGE_SIZE,
                      pages=max((total + PAGE_SIZE - 1) // PAGE_SIZE, 1), query=query,
                      objects=ledger.quarantine_objects(connection), notice=notice,
                      editable=editable_directions(user, connection, rows),
                      may_act_on_all=bool(directions) and all(
                          may_edit_dag(user, dag_id(d, connection)) for d in sorted(directions)),
                      vault_links=vault_links(connection, rows))

    @app.get("/quarantine.csv")
    def quarantine_csv(connection: Annotated[str, Query(min_length=1, max_length=100)],
                       object_name: Annotated[str | None, Query(alias="object", max_length=100)] = None,
                       rule: Annotated[str | None, Query(max_length=200)] = None,
                       min_age: Annotated[str | None, Query(alias="min_age_days", max_length=4,
                                                            pattern="^[0-9]*$")] = None) -> StreamingResponse:
        min_age_days = age_days(min_age)
        rows = _ledger().iter_quarantine(connection, object_name=object_name or None, rule=rule or None,
                                         min_age_days=min_age_days or None)

        def lines():
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(CSV_COLUMNS)
            for row in rows:
                writer.writerow([csv_cell(" | ".join(row[c]) if c == "reasons" else row[c]) for c in CSV_COLUMNS])
                if buffer.tell() > 65536:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
            yield buffer.getvalue()

        filename = f"quarantine-{connection}.csv".replace('"', "")
        return StreamingResponse(lines(), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @app.post("/quarantine/action", dependencies=[Depends(same_origin)])
    def quarantine_action(quarantine_id: Annotated[int, Form()],
                          action: Annotated[str, Form(pattern="^(retry|ignore)$")],
                          reason: Annotated[str, Form(max_length=1000)] = "",
                          back: Annotated[str, Form(pattern="^(quarantine|record)$")] = "quarantine",
                          user: Any = user_dependency):
        ledger = _ledger()
        held = ledger.quarantine_entry(quarantine_id)
        if held is None:
            raise HTTPException(status_code=404, detail="No such quarantine row")
        require_edit(user, dag_id(held["direction"], held["connection"]))
        if action == "ignore" and not reason.strip():
            raise HTTPException(status_code=422, detail="ignoring a record needs a reason")
        ledger.act_on_quarantine(quarantine_id, action, user.get_name(), reason.strip() or None)
        done = "will be read again in the next run" if action == "retry" else "ignored for good"
        notice = f"{held['object']} {held['source_id']}: {done}"
        if back == "record":
            return back_to("../record", connection=held["connection"], source_id=held["source_id"], notice=notice)
        return back_to("../quarantine", connection=held["connection"], notice=notice)

    @app.post("/quarantine/bulk", dependencies=[Depends(same_origin)])
    def quarantine_bulk(connection: Annotated[str, Form(min_length=1, max_length=100)],
                        action: Annotated[str, Form(pattern="^(retry|ignore)$")],
                        expected: Annotated[int, Form(ge=0)],
                        object_name: Annotated[str, Form(alias="object", max_length=100)] = "",
                        rule: Annotated[str, Form(max_length=200)] = "",
                        min_age_days: Annotated[str, Form(max_length=4, pattern="^[0-9]*$")] = "",
                        reason: Annotated[str, Form(max_length=1000)] = "",
                        user: Any = user_dependency):
        """Retry or ignore every open quarantine row the filter matches, each recorded as its
        own decision (as the per-record forms record one). Needs edit permission on the DAG of
        every direction among them; `expected` (the count the page showed) must still match,
        so rows quarantined since the page was shown are not decided unseen."""
        ledger = _ledger()
        age = age_days(min_age_days)
        filters = {"object_name": object_name or None, "rule": rule or None, "min_age_days": age or None}
        rows = ledger.quarantine_ids(connection, **filters)
        for direction in sorted({d for _, d in rows}):
            require_edit(user, dag_id(direction, connection))
        if action == "ignore" and not reason.strip():
            raise HTTPException(status_code=422, detail="ignoring records needs a reason")
        if len(rows) != expected:
            raise HTTPException(status_code=409, detail=f"the filter now matches {len(rows)} records, not the "
                                                        f"{expected} shown: look at them again, then decide")
        done = ledger.act_on_quarantine_rows([i for i, _ in rows], action, user.get_name(), reason.strip() or None)
        what = "will be read again in the next run" if action == "retry" else "ignored for good"
        return back_to("../quarantine", connection=connection, object=object_name, rule=rule,
                       min_age_days=min_age_days, notice=f"{done} records {what}")

    @app.post("/backfill", dependencies=[Depends(same_origin)])
    def backfill(request: Request, connection: Annotated[str, Form(max_length=100)],
                 direction: Annotated[str, Form(max_length=20)],
                 window_start: Annotated[datetime, Form()], window_end: Annotated[datetime, Form()],
                 user: Any = user_dependency):
        dag = dag_id(direction, connection)
        require_edit(user, dag, runs=True)
        answer = create_backfill(request, dag, window_start, window_end)
        if not answer.ok:
            detail = answer.json().get("detail") if "json" in answer.headers.get("content-type", "") else answer.text
            raise HTTPException(status_code=answer.status_code, detail=f"Airflow refused the backfill: {detail}")
        created = answer.json()
        return back_to("./", notice=f"backfill {created.get('id')} of {dag} created for "
                                    f"{timestamp(window_start.isoformat())} - {timestamp(window_end.isoformat())}")

    @app.get("/record", response_class=HTMLResponse)
    def record(connection: Annotated[str, Query(min_length=1, max_length=100)],
               source_id: Annotated[str, Query(min_length=1, max_length=255)],
               notice: Annotated[str | None, Query(max_length=300)] = None,
               user: Any = user_dependency) -> HTMLResponse:
        ledger = _ledger()
        connections = [c["connection"] for c in ledger.connections()]
        history = ledger.record_history(connection, source_id.strip())
        found = bool(history["outcomes"] or history["quarantine"] or history["id_map"] or history.get("versions"))
        return render("record.html", history=history, found=found, connections=connections, notice=notice,
                      editable=editable_directions(user, connection, history["quarantine"]),
                      vault_links=vault_links(connection, history["quarantine"]))

    @app.get("/reports/{path:path}")
    def reports(path: str) -> Response:
        from clinical_crm.engine import storage

        tree = _reports()
        rel = tree.inside(path)
        if not rel or not tree.is_file(rel):
            raise HTTPException(status_code=404, detail="No such report file")
        # Reports show vault data: run them in an opaque origin, away from the Airflow session.
        headers = {"Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff"}
        local = tree.local_file(rel)
        if local is not None:
            return FileResponse(local, headers=headers)
        return Response(tree.read_bytes(rel), media_type=storage.media_type(rel), headers=headers)

    return app


class _PageApp:
    """`fastapi_apps`, built on first read. Every task process loads the plugins too, and only
    the api-server reads this: building the app (and importing Airflow's API security) at import
    time cost each task ~1 s."""

    def __get__(self, instance, owner) -> list[dict]:
        try:
            apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Clinical CRM connection"}]
        except Exception:  # a broken page must not keep the api-server from starting
            logging.getLogger(__name__).exception("the Clinical CRM page could not be built; it is not mounted")
            apps = []
        owner.fastapi_apps = apps  # built once per process
        return apps


class ClinicalCrmPlugin(AirflowPlugin):
    name = "clinical_crm"
    fastapi_apps = _PageApp()
    external_views = [{
        "name": "Clinical CRM connection",
        "href": URL_PREFIX.lstrip("/") + "/",
        "url_route": "clinical-crm",
        "destination": "nav",
        "category": "browse",
    }]
