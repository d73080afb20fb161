"""The data engineers' page inside the Airflow UI (an Airflow 3 plugin).

A small FastAPI app, mounted by the api-server under ``/clinical-crm``, renders server-side HTML
from the sync ledger's read API only: per connection the recent runs (window, state, counts, data
quality with a link to the run's Data Docs), the open quarantine with its reasons, and a lookup of
one record's history by source id (outcomes, e.g. `superseded` when a newer version had already been
sent; quarantine; id map; the newest source version sent). The Data Docs HTML is served from the reports folder
(``settings.reports_dir()``); paths outside it are refused.

The plugin also declares an external view, so the page is listed in the UI's "Browse" menu and
shown inside the Airflow UI. Every route requires an authenticated Airflow user (the api-server's
session cookie or bearer token), like Airflow's own API.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from airflow.plugins_manager import AirflowPlugin

from clinical_crm import settings

URL_PREFIX = "/clinical-crm"
REPORT_CSP = "sandbox allow-scripts allow-forms"
COUNT_COLUMNS = ("extracted", "loaded", "unchanged", "quarantined", "failed")
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


TEMPLATES.filters["timestamp"] = timestamp


def total_counts(counts: dict) -> dict[str, int]:
    """Run counts as one row: totals of the per-object counts when the counts are nested by object."""
    totals = {name: 0 for name in COUNT_COLUMNS}
    for key, value in (counts or {}).items():
        if isinstance(value, dict):
            for name in COUNT_COLUMNS:
                totals[name] += int(value.get(name) or 0)
        elif key in totals:
            totals[key] += int(value or 0)
    return totals


def object_counts(counts: dict) -> dict[str, dict]:
    """The per-object part of a run's counts (empty when the counts are flat totals)."""
    return {key: value for key, value in (counts or {}).items() if isinstance(value, dict)}


def report_file(path: str | None) -> Path | None:
    """A Data Docs file (a folder means its index.html) if it lies inside the reports folder."""
    if not path:
        return None
    root = settings.reports_dir().resolve()
    target = Path(path)
    if not target.is_absolute():
        target = root / target
    target = target.resolve()
    if target.is_dir():
        target = target / "index.html"
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return target


def report_link(path: Path | str | None) -> str | None:
    """Relative URL (served by this app) of a Data Docs file, or None when it is not servable."""
    target = report_file(str(path) if path else None)
    if target is None:
        return None
    return "reports/" + quote(target.relative_to(settings.reports_dir().resolve()).as_posix())


def validation_pages(site_index: Path | None) -> dict[str, list[dict]]:
    """The validation result pages of a Data Docs site by run name (the DAG run id).

    Great Expectations lays them out as validations/<suite path>/<run name>/<time>/<batch>.html,
    where our suite names are <connection>.<object>.<suite>.
    """
    pages: dict[str, list[dict]] = {}
    if site_index is None:
        return pages
    validations = site_index.parent / "validations"
    for page in sorted(validations.glob("*/*/*/*/*/*.html")):
        suite_parts = page.relative_to(validations).parts[:3]
        run_name = page.parent.parent.name
        link = report_link(page)
        if link:
            pages.setdefault(run_name, []).append({"label": " / ".join(suite_parts[1:]), "link": link})
    return pages


def data_quality(ledger, run: dict, pages_by_site: dict) -> dict:
    """Pass/fail of a run's quality checks, with links to the run's own Data Docs pages."""
    summaries = ledger.dq_summaries(run["run_id"])
    passed = all(s["success"] for s in summaries) if summaries else None
    candidates = [run.get("dq_report"), *(s.get("report_path") for s in summaries)]
    site = next((found for found in map(report_file, candidates) if found), None)
    if site is not None and site not in pages_by_site:
        pages_by_site[site] = validation_pages(site)
    pages = pages_by_site.get(site, {}).get(run["dag_run_id"], []) if site else []
    failing = sum(int(s.get("failing_rows") or 0) for s in summaries)
    return {"passed": passed, "link": report_link(site) if site else None, "pages": pages,
            "failing_rows": failing, "objects": summaries}


def render(template: str, status_code: int = 200, **context) -> HTMLResponse:
    html = TEMPLATES.get_template(template).render(count_columns=COUNT_COLUMNS, **context)
    return HTMLResponse(html, status_code=status_code)


def ledger_unavailable(request: Request, error: SQLAlchemyError) -> HTMLResponse:
    """The ledger's database cannot be read: say which one (without its password) and why."""
    url = make_url(settings.ledger_url()).render_as_string(hide_password=True)
    return render("unavailable.html", status_code=503, connections=[], ledger_url=url,
                  error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


def create_app(require_airflow_login: bool = True) -> FastAPI:
    """The page's app; `require_airflow_login=False` only for tests of the app on its own."""
    dependencies = []
    if require_airflow_login:
        from airflow.api_fastapi.core_api.security import requires_authenticated

        dependencies.append(Depends(requires_authenticated()))
    app = FastAPI(
        title="Clinical CRM connection: data engineers' page",
        dependencies=dependencies,
        docs_url=None, redoc_url=None, openapi_url=None,
        exception_handlers={SQLAlchemyError: ledger_unavailable},
    )

    @app.get("/", response_class=HTMLResponse)
    def overview(limit: Annotated[int, Query(ge=1, le=200)] = 20) -> HTMLResponse:
        ledger = _ledger()
        sections = []
        pages_by_site: dict = {}  # Data Docs sites scanned once per request
        for connection in ledger.connections():
            name = connection["connection"]
            runs = []
            for run in ledger.recent_runs(name, limit=limit):
                runs.append({**run, "totals": total_counts(run.get("counts")),
                             "objects": object_counts(run.get("counts")),
                             "dq": data_quality(ledger, run, pages_by_site)})
            sections.append({"name": name, "runs": runs, "quarantine": ledger.open_quarantine(name)})
        return render("overview.html", sections=sections, connections=[s["name"] for s in sections])

    @app.get("/record", response_class=HTMLResponse)
    def record(connection: Annotated[str, Query(min_length=1, max_length=100)],
               source_id: Annotated[str, Query(min_length=1, max_length=255)]) -> HTMLResponse:
        ledger = _ledger()
        connections = [c["connection"] for c in ledger.connections()]
        history = ledger.record_history(connection, source_id.strip())
        found = bool(history["outcomes"] or history["quarantine"] or history["id_map"] or history.get("versions"))
        return render("record.html", history=history, found=found, connections=connections)

    @app.get("/reports/{path:path}")
    def reports(path: str) -> FileResponse:
        root = settings.reports_dir().resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise HTTPException(status_code=404, detail="No such report file")
        # Reports show vault data: run them in an opaque origin, away from the Airflow session.
        return FileResponse(target, headers={"Content-Security-Policy": REPORT_CSP,
                                             "X-Content-Type-Options": "nosniff"})

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
