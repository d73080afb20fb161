"""The FastAPI application that plays one vault (CTMS or CRM) over the Vault REST API."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import threading
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vault_sandbox.control import (Downtime, FaultConfig, Faults, FixedWindow, Latency, LatencyProfile,
                                   PerKeyWindow, RequestCounters, Sessions, call_kind, endpoint_key, latency_profile,
                                   latency_values)
from vault_sandbox.db import CREDENTIALS, DELETIONS, Store
from vault_sandbox.models import VaultModel, load_model, relationship_name
from vault_sandbox.records import MAX_BATCH, Caller, RecordError, Writer, failure, output_value, to_output
from vault_sandbox.vql import Compiled, VqlError, compile_query, keyset_after, normalise_datetime, parse

API_VERSIONS = ["v24.1", "v24.2", "v24.3", "v25.1", "v25.2"]
LATEST_VERSION = API_VERSIONS[-1]
DELETIONS_DEFAULT_LIMIT, DELETIONS_MAX_LIMIT = 1000, 5000   # Vault's deleted-records API
DOWNTIME_HEADER = "X-VaultAPI-DowntimeExpectedDurationMinutes"


@dataclass
class Options:
    vault_id: int | None = None           # None: the app's default (CTMS 1001, CRM 2002)
    burst_limit: int = 2000
    burst_window_seconds: float = 300.0
    burst_delay_ms: int = 500
    auth_limit: int = 120                 # auth calls per minute
    auth_window_seconds: float = 60.0     # the login limit's window (Vault: one minute; shorter in tests)
    session_idle_seconds: float = 1200.0
    session_max_seconds: float = Sessions.MAX_AGE_SECONDS   # Vault: 48 hours (shorter in tests)
    page_size: int = 1000                 # default and maximum VQL page size
    inactive_object_types: list[str] = field(default_factory=list)   # "object.type" names not activated
    fault: FaultConfig = field(default_factory=FaultConfig)
    latency: LatencyProfile = field(default_factory=LatencyProfile)
    latency_seed: int = 0


@dataclass
class Cursor:
    """A VQL query's paging state, kept under its query id like Vault's next_page links."""
    compiled: Compiled
    total: int
    pagesize: int
    version: str
    next_offset: int = -1                 # offset right after the last page served
    last_key: tuple | None = None         # sort key of the last row served (for keyset paging)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Sandbox:
    """Everything one sandbox process holds: the vault's model and store, sessions, limits, faults."""

    def __init__(self, app_name: str, db_path: str, options: Options):
        self.model: VaultModel = load_model(app_name, options.vault_id)
        self.store = Store(self.model, db_path)
        stored = self.store.data_vault_id()
        if stored not in (None, self.model.vault_id):
            raise ValueError(f"{db_path} holds the records of vault {stored} (global ids {stored}_...), not of vault "
                             f"{self.model.vault_id}: serve it with --vault-id {stored}, or reseed it")
        self.options = options
        self.inactive_types = self._object_types_named(options.inactive_object_types)
        self.sessions = Sessions(options.session_idle_seconds, options.session_max_seconds)
        self.burst = FixedWindow(options.burst_limit, options.burst_window_seconds)
        self.auth_window = PerKeyWindow(options.auth_limit, options.auth_window_seconds)   # per user
        self.downtime = Downtime()
        self.counters = RequestCounters()
        self.faults = Faults(options.fault)
        self.latency = Latency(options.latency, options.latency_seed)
        self.cursors: OrderedDict[str, Cursor] = OrderedDict()
        self.paging: Counter = Counter()          # pages served by keyset vs by OFFSET
        self.cursor_lock = threading.Lock()

    def _object_types_named(self, names: list[str]) -> set[tuple[str, str]]:
        """("object", "type") pairs of "object.type" names, each checked against the model."""
        known = {f"{o.name}.{t}": (o.name, t) for o in self.model.objects.values() for t in o.object_types}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"--inactive-object-types: unknown object types {unknown}; the "
                             f"{self.model.app} model has {', '.join(known)}")
        return {known[n] for n in names}

    # -- auth -----------------------------------------------------------------------------

    def authenticate(self, username: str, password: str) -> dict:
        if self.auth_window.hit(username.lower()) < 0:
            return failure("API_LIMIT_EXCEEDED", "You have exceeded the maximum number of authentication API "
                                                 "calls allowed in a one minute period.")
        users = self.store.table("user__sys")
        creds = self.store.table(CREDENTIALS)
        with self.store.engine.connect() as conn:
            row = conn.execute(select(users.c.id, users.c.security_profile__sys, users.c.status__v, creds.c.password)
                               .join(creds, creds.c.user_id == users.c.id)
                               .where(users.c.username__sys == username)).first()
        if row is None or row.password != password or row.status__v != "active__v":
            return failure("USERNAME_OR_PASSWORD_INCORRECT", "Authentication failed for user: " + username)
        session = self.sessions.open(row.id, row.security_profile__sys, username)
        vault = {"id": int(self.model.vault_id), "name": self.model.label, "url": "/"}
        return {"responseStatus": "SUCCESS", "sessionId": session.session_id, "userId": row.id,
                "vaultId": int(self.model.vault_id), "vaultIds": [vault]}

    # -- queries --------------------------------------------------------------------------

    def _readable_types(self, object_name: str, profile: str) -> list[str] | None:
        """Object type ids this profile may read; None when it may read them all."""
        obj = self.model.objects[object_name]
        readable = [api for api in obj.object_types
                    if "read" in self.model.permissions(profile, object_name, api)]
        if len(readable) == len(obj.object_types):
            return None
        return [self.store.object_type_id(object_name, api) for api in readable]

    def query(self, q: str, caller: Caller, version: str) -> dict:
        parsed = parse(q)
        compiled = compile_query(parsed, self.store)
        readable = self._readable_types(compiled.object_name, caller.profile)
        if readable == []:
            return failure("INSUFFICIENT_ACCESS", f"You do not have permission to read {compiled.object_name}")
        if readable is not None:
            base = self.store.table(compiled.object_name)
            compiled.conditions.append(base.c.object_type__v.in_(readable))
        pagesize = min(compiled.pagesize or self.options.page_size, self.options.page_size)
        with self.store.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(compiled.count_statement().subquery())).scalar()
        cursor = Cursor(compiled, total, pagesize, version)
        query_id = str(uuid.uuid4())
        with self.cursor_lock:
            self.cursors[query_id] = cursor
            while len(self.cursors) > 2000:
                self.cursors.popitem(last=False)
        return self.page(query_id, compiled.pageoffset or 0, pagesize)

    def page(self, query_id: str, offset: int, pagesize: int | None) -> dict:
        with self.cursor_lock:
            cursor = self.cursors.get(query_id)
            if cursor is not None:
                self.cursors.move_to_end(query_id)
        if cursor is None:
            return failure("INVALID_DATA", f"Query {query_id} is unknown or has expired; run the query again")
        pagesize = max(1, min(pagesize or cursor.pagesize, self.options.page_size))
        compiled = cursor.compiled
        with cursor.lock:
            order_by = [col.desc() if descending else col.asc() for col, descending in compiled.order]
            rows = None
            if offset == cursor.next_offset and cursor.last_key is not None and offset > 0:
                after, exact = keyset_after(compiled.order, cursor.last_key)
                if after is not None:
                    # O(page): continue right after the last row served instead of skipping `offset` rows.
                    rows = self._rows(compiled.statement(after).order_by(*order_by).limit(pagesize))
                    self.paging["keyset"] += 1
                    if not exact and len(rows) < pagesize and offset + len(rows) < cursor.total:
                        rows = None     # NULL rows follow a descending first column: read this page by OFFSET
            if rows is None:
                rows = self._rows(compiled.statement().order_by(*order_by).limit(pagesize).offset(offset))
                self.paging["offset"] += 1
            if rows:
                n_select = len(compiled.selected)
                cursor.last_key = tuple(rows[-1][n_select:])
                cursor.next_offset = offset + len(rows)
        data = []
        for row in rows:
            data.append({s.key: output_value(s.field, row[i]) for i, s in enumerate(compiled.selected)})
        details: dict[str, Any] = {"pagesize": pagesize, "pageoffset": offset, "size": len(data),
                                   "total": cursor.total}
        if offset + len(data) < cursor.total and data:
            details["next_page"] = (f"/api/{cursor.version}/query/{query_id}"
                                    f"?pagesize={pagesize}&pageoffset={offset + len(data)}")
        if offset > 0:
            details["previous_page"] = (f"/api/{cursor.version}/query/{query_id}"
                                        f"?pagesize={pagesize}&pageoffset={max(0, offset - pagesize)}")
        return {"responseStatus": "SUCCESS", "responseDetails": details, "data": data}

    def _rows(self, statement) -> list:
        with self.store.engine.connect() as conn:
            return conn.execute(statement).all()

    # -- writes ---------------------------------------------------------------------------

    def write(self, object_name: str, records: Any, mode: str, id_param: str | None, caller: Caller,
              version: str) -> dict:
        obj = self.model.objects.get(object_name)
        if obj is None:
            return failure("INVALID_DATA", f"Object '{object_name}' does not exist")
        if isinstance(records, dict):
            records = [records]
        if not isinstance(records, list) or not records:
            return failure("INVALID_DATA", "The body must hold a list of records")
        if len(records) > MAX_BATCH:
            return failure("INVALID_DATA", f"Too many records: {len(records)}; the maximum batch size is "
                                           f"{MAX_BATCH}")
        right = {"create": "create", "update": "edit", "delete": "delete"}[mode]
        rights = self.model.permissions(caller.profile, object_name)
        typed = {r for api in obj.object_types for r in self.model.permissions(caller.profile, object_name, api)}
        if right not in rights and right not in typed:
            return failure("INSUFFICIENT_ACCESS", f"You do not have permission to {right} {object_name} records")
        if mode == "create" and id_param and "edit" not in rights | typed:
            return failure("INSUFFICIENT_ACCESS", f"Upsert needs create and edit permission on {object_name}")
        inactive = frozenset(self.store.object_type_id(o, t) for o, t in self.inactive_types if o == object_name)
        writer = Writer(self.store, obj, caller, version, race=self.faults.race_for_record, inactive_types=inactive)
        try:
            results = writer.write(records, mode, id_param)
        except RecordError as exc:
            return failure(exc.error_type, exc.message)
        return {"responseStatus": "SUCCESS", "data": results}

    # -- reads ----------------------------------------------------------------------------

    def get_record(self, object_name: str, record_id: str, caller: Caller) -> dict:
        obj = self.model.objects.get(object_name)
        if obj is None:
            return failure("INVALID_DATA", f"Object '{object_name}' does not exist")
        table = self.store.table(object_name)
        with self.store.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.id == record_id)).mappings().first()
        if row is None:
            return failure("INVALID_DATA", f"No {object_name} record has id '{record_id}'")
        type_name = self.store.object_type_names.get(row["object_type__v"], (None, None))[1]
        if "read" not in self.model.permissions(caller.profile, object_name, type_name):
            return failure("INSUFFICIENT_ACCESS", f"You do not have permission to read this {object_name} record")
        return {"responseStatus": "SUCCESS", "data": to_output(obj, self.store, dict(row))}

    def deletions(self, object_name: str, params: dict, version: str) -> dict:
        if object_name not in self.model.objects:
            return failure("INVALID_DATA", f"Object '{object_name}' does not exist")
        table = self.store.table(DELETIONS)
        try:
            limit = max(1, min(int(params.get("limit", DELETIONS_DEFAULT_LIMIT)), DELETIONS_MAX_LIMIT))
            offset = max(0, int(params.get("offset", 0)))
            start = normalise_datetime(params["start_date"]) if params.get("start_date") else None
            end = normalise_datetime(params["end_date"]) if params.get("end_date") else None
        except (ValueError, VqlError) as exc:
            return failure("INVALID_DATA", f"Invalid parameter: {getattr(exc, 'message', exc)}")
        condition = [table.c.object_name == object_name]
        if start:
            condition.append(table.c.date_deleted >= start)
        if end:
            condition.append(table.c.date_deleted <= end)
        with self.store.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(table).where(*condition)).scalar()
            rows = conn.execute(select(table).where(*condition).order_by(table.c.date_deleted, table.c.seq)
                                .limit(limit).offset(offset)).mappings().all()
        data = [{"id": r["id"], "date_deleted": r["date_deleted"], "global_id__sys": r["global_id__sys"],
                 "link__sys": r["link__sys"]} for r in rows]
        details: dict[str, Any] = {"total": total, "size": len(data), "limit": limit, "offset": offset}
        if offset + len(data) < total:
            query = {k: v for k, v in params.items() if k not in ("offset", "limit")}
            extra = "".join(f"&{k}={v}" for k, v in query.items())
            details["next_page"] = (f"/api/{version}/objects/deletions/vobjects/{object_name}"
                                    f"?limit={limit}&offset={offset + len(data)}{extra}")
        return {"responseStatus": "SUCCESS", "responseDetails": details, "data": data}

    def metadata(self, object_name: str) -> dict:
        obj = self.model.objects.get(object_name)
        if obj is None:
            return failure("INVALID_DATA", f"Object '{object_name}' does not exist")
        type_names = {"text": "String", "long_text": "LongText", "picklist": "Picklist", "object": "Object",
                      "boolean": "Boolean", "date": "Date", "datetime": "DateTime", "number": "Number",
                      "id": "ID"}
        fields = []
        for f in obj.fields.values():
            entry: dict[str, Any] = {"name": f.name, "label": f.label or f.name, "type": type_names[f.type],
                                     "required": f.required, "unique": f.unique, "editable": f.editable,
                                     "system_managed": f.standard and not f.editable}
            if f.max_length:
                entry["max_length"] = f.max_length
            if f.required_for_types:
                entry["required_for_types"] = f.required_for_types     # sandbox extension
            if f.type == "picklist":
                entry["picklist"] = f.picklist
                entry["picklist_values"] = [{"name": k, "label": v}
                                            for k, v in self.model.picklist_values(f).items()]
            if f.type == "object":
                entry["object"] = {"name": f.object}
                entry["relationship_name"] = relationship_name(f.name)
                entry["relationship_outbound_name"] = relationship_name(f.name)
            fields.append(entry)
        object_types = [{"name": api, "label": label, "id": self.store.object_type_id(obj.name, api),
                         "active": (obj.name, api) not in self.inactive_types}
                        for api, label in obj.object_types.items()]
        return {"responseStatus": "SUCCESS",
                "object": {"name": obj.name, "label": obj.label, "prefix": obj.prefix, "fields": fields,
                           "object_types": object_types}}

    def configuration(self, component: str) -> dict:
        """Vault's configuration API, for object types only: `Objecttype` lists every object type,
        `Objecttype.{object}.{type}` answers one."""
        kind, _, name = component.partition(".")
        if kind != "Objecttype":
            return failure("MALFORMED_URL", f"Component type '{kind}' is not supported by the sandbox "
                                            f"(only Objecttype)")
        entries = [{"name": f"{obj.name}.{api}", "object": obj.name, "type": api, "label": label,
                    "active": (obj.name, api) not in self.inactive_types}
                   for obj in self.model.objects.values() for api, label in obj.object_types.items()]
        if not name:
            return {"responseStatus": "SUCCESS", "data": entries}
        found = [e for e in entries if e["name"] == name]
        if not found:
            return failure("INVALID_DATA", f"Object type '{name}' does not exist")
        return {"responseStatus": "SUCCESS", "data": found[0]}

    def user_permissions(self, user_id: str, filter_text: str | None) -> dict:
        users = self.store.table("user__sys")
        with self.store.engine.connect() as conn:
            profile = conn.execute(select(users.c.security_profile__sys).where(users.c.id == user_id)).scalar()
        if profile is None:
            return failure("INVALID_DATA", f"No user has id '{user_id}'")
        entries = []
        for obj in self.model.objects.values():
            entries.append(self._permission_entry(f"object.{obj.name}.object_actions",
                                                  self.model.permissions(profile, obj.name)))
            if len(obj.object_types) > 1:
                for api in obj.object_types:
                    entries.append(self._permission_entry(f"object.{obj.name}.object_type.{api}.object_actions",
                                                          self.model.permissions(profile, obj.name, api)))
        if filter_text:
            wanted = filter_text.split("::", 1)[1] if "::" in filter_text else filter_text
            # Asking for an object's actions also shows its object types' actions.
            type_prefix = wanted[: -len("object_actions")] + "object_type." \
                if wanted.endswith(".object_actions") else None
            entries = [e for e in entries
                       if e["name__v"] == wanted or (type_prefix and e["name__v"].startswith(type_prefix))]
        return {"responseStatus": "SUCCESS", "data": entries}

    @staticmethod
    def _permission_entry(name: str, rights: set[str]) -> dict:
        return {"name__v": name, "permissions": {r: r in rights for r in ("read", "edit", "create", "delete")}}

    def me(self, session) -> dict:
        users = self.store.table("user__sys")
        with self.store.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.id == session.user_id)).mappings().first()
        user = {"id": row["id"], "user_name__v": row["username__sys"], "user_first_name__v": row["first_name__sys"],
                "user_last_name__v": row["last_name__sys"], "user_email__v": row["email__sys"],
                "security_profile__v": row["security_profile__sys"], "vault_id__v": int(self.model.vault_id)}
        return {"responseStatus": "SUCCESS", "users": [{"user": user}]}


# ---------------------------------------------------------------------------------------------
# HTTP layer


def envelope(body: dict, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status)


async def form_fields(request: Request) -> dict[str, str]:
    """Form fields from a urlencoded body, falling back to the query string (both are accepted)."""
    fields = {k: v[-1] for k, v in parse_qs(request.url.query).items()}
    body = await request.body()
    ctype = request.headers.get("content-type", "")
    if body and "json" in ctype:
        try:
            parsed = json.loads(body)
            if isinstance(parsed, dict):
                fields.update({k: str(v) for k, v in parsed.items()})
        except ValueError:
            pass
    elif body and "multipart" in ctype:
        form = await request.form()
        fields.update({k: str(v) for k, v in form.items()})
    elif body:
        fields.update({k: v[-1] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()})
    return fields


async def write_body(request: Request) -> Any:
    body = await request.body()
    ctype = request.headers.get("content-type", "")
    if "csv" in ctype:
        reader = csv.DictReader(io.StringIO(body.decode("utf-8-sig")))
        return [{k: (v if v != "" else None) for k, v in row.items()} for row in reader]
    return json.loads(body or b"null")


def _is_auth(method: str, path: str) -> bool:
    return method == "POST" and path.rstrip("/").endswith("/auth") and path.startswith("/api/v")


def _is_write(method: str, path: str) -> bool:
    return "/vobjects/" in path and method in ("POST", "PUT", "DELETE")


def create_app(app_name: str, db_path: str, options: Options | None = None) -> FastAPI:
    sandbox = Sandbox(app_name, db_path, options or Options())
    app = FastAPI(title=f"Vault sandbox ({app_name})", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sandbox = sandbox

    @app.exception_handler(StarletteHTTPException)
    async def vault_style_http_errors(request: Request, exc: StarletteHTTPException):
        # Vault answers unknown paths and methods with an envelope too.
        if exc.status_code == 405:
            return envelope(failure("METHOD_NOT_SUPPORTED", f"{request.method} is not supported on {request.url.path}"))
        return envelope(failure("MALFORMED_URL", f"Unknown resource: {request.url.path}"))

    def caller(request: Request) -> Caller:
        session = request.state.session
        return Caller(session.user_id, session.profile)

    @app.middleware("http")
    async def vault_behaviour(request: Request, call_next):
        method, path = request.method, request.url.path
        is_auth = _is_auth(method, path)
        # The test helper's own logins (X-Sandbox-Admin) count like admin calls: not at all.
        is_admin = path.startswith("/sandbox") or (is_auth and "x-sandbox-admin" in request.headers)
        is_public = is_auth or path.rstrip("/") == "/api"
        if not is_admin:
            sandbox.counters.count(endpoint_key(method, path), is_auth,
                                   request.headers.get("x-vaultapi-referenceid", ""))
            minutes = sandbox.downtime.minutes_left() if path.rstrip("/") != "/api" else None
            if minutes is not None:
                # [U] the status code, error type and X-VaultAPI-Status value: Vault documents the
                # header, not the exact answer during downtime
                sandbox.counters.count_maintenance()
                return JSONResponse(
                    failure("SERVICE_UNAVAILABLE", "Vault is down for scheduled maintenance"), status_code=503,
                    headers={DOWNTIME_HEADER: f"{round(minutes, 4):g}", "X-VaultAPI-Status": "DOWN"})
        headers: dict[str, str] = {}
        if not is_admin and not is_public:
            remaining = sandbox.burst.hit()
            headers["X-VaultAPI-BurstLimit"] = str(sandbox.burst.limit)
            headers["X-VaultAPI-BurstLimitRemaining"] = str(max(0, remaining))
            if remaining < 0:
                # Past the burst limit Vault slows calls down instead of refusing them.
                delay = sandbox.options.burst_delay_ms
                headers["X-VaultAPI-ResponseDelay"] = str(delay)
                sandbox.counters.count_delayed()
                await asyncio.sleep(delay / 1000)
        elif not is_admin:
            headers["X-VaultAPI-BurstLimit"] = str(sandbox.burst.limit)
            headers["X-VaultAPI-BurstLimitRemaining"] = str(max(0, sandbox.burst.remaining()))
        response = await _answer(request, call_next, is_admin, is_public)
        if not is_admin and path.rstrip("/") != "/api":
            # A real vault's time per call, awaited once the answer is computed: it holds no lock or
            # transaction and blocks no other call, so concurrent calls wait side by side.
            delay = sandbox.latency.seconds(call_kind(method, path), request.scope.get("sandbox.records", 1))
            if delay:
                await asyncio.sleep(delay)
        response.headers.update(headers)
        return response

    async def _answer(request: Request, call_next, is_admin: bool, is_public: bool) -> Response:
        method, path = request.method, request.url.path
        if not is_public:
            token = request.headers.get("authorization", "")
            token = token[7:] if token.lower().startswith("bearer ") else token
            session = sandbox.sessions.touch(token.strip())
            if session is None:
                if not is_admin:
                    sandbox.counters.count_invalid_session()
                return envelope(failure("INVALID_SESSION_ID", "Invalid or inactive session"))
            request.state.session = session
            if not is_admin:
                kind = sandbox.faults.for_call(_is_write(method, path))
                if kind == "exception":
                    return envelope({"responseStatus": "EXCEPTION",
                                     "errors": [{"type": "UNEXPECTED_ERROR",
                                                 "message": "An unexpected error occurred (injected fault)"}]})
                if kind in ("http502", "http503"):
                    code = 502 if kind == "http502" else 503
                    return PlainTextResponse(f"<html><body>{code} (injected fault)</body></html>",
                                             status_code=code, media_type="text/html")
                if kind == "drop":
                    request.scope["sandbox.drop"] = True
                    return Response(status_code=500)
                if kind == "session_expiry":
                    sandbox.sessions.end(session.session_id)
                    sandbox.counters.count_invalid_session()
                    return envelope(failure("INVALID_SESSION_ID", "Invalid or inactive session"))
                if kind == "slow":
                    await asyncio.sleep(sandbox.faults.config.slow_seconds)
        try:
            return await call_next(request)
        except Exception as exc:  # noqa: BLE001 - Vault answers unexpected errors with an envelope
            return envelope({"responseStatus": "EXCEPTION",
                             "errors": [{"type": "UNEXPECTED_ERROR", "message": f"{type(exc).__name__}: {exc}"}]})

    # -- Vault endpoints ------------------------------------------------------------------

    @app.get("/api")
    @app.get("/api/")
    async def versions(request: Request):
        base = str(request.base_url).rstrip("/")
        return envelope({"responseStatus": "SUCCESS", "values": {v: f"{base}/api/{v}" for v in API_VERSIONS}})

    @app.post("/api/{version}/auth")
    async def auth(version: str, request: Request):
        fields = await form_fields(request)
        if not fields.get("username") or not fields.get("password"):
            return envelope(failure("PARAMETER_REQUIRED", "username and password are required"))
        return envelope(await run_in_threadpool(sandbox.authenticate, fields["username"], fields["password"]))

    @app.post("/api/{version}/keep-alive")
    async def keep_alive(version: str):
        return envelope({"responseStatus": "SUCCESS"})

    @app.delete("/api/{version}/session")
    async def end_session(version: str, request: Request):
        sandbox.sessions.end(request.state.session.session_id)
        return envelope({"responseStatus": "SUCCESS"})

    @app.get("/api/{version}/objects/users/me")
    async def me(version: str, request: Request):
        return envelope(await run_in_threadpool(sandbox.me, request.state.session))

    @app.get("/api/{version}/objects/users/{user_id}/permissions")
    async def permissions(version: str, user_id: str, request: Request):
        target = request.state.session.user_id if user_id == "me" else user_id
        return envelope(await run_in_threadpool(sandbox.user_permissions, target,
                                                request.query_params.get("filter")))

    @app.post("/api/{version}/query")
    async def query(version: str, request: Request):
        fields = await form_fields(request)
        q = fields.get("q")
        if not q:
            return envelope(failure("PARAMETER_REQUIRED", "Missing required parameter 'q'"))
        if len(q) > 50_000:
            return envelope(failure("INVALID_DATA", "A VQL statement may hold at most 50,000 characters"))
        try:
            body = await run_in_threadpool(sandbox.query, q, caller(request), version)
        except VqlError as exc:
            return envelope(failure(exc.error_type, exc.message))
        return envelope(body)

    @app.api_route("/api/{version}/query/{query_id}", methods=["GET", "POST"])
    async def query_page(version: str, query_id: str, request: Request):
        fields = await form_fields(request)
        try:
            offset = int(fields.get("pageoffset", 0))
            pagesize = int(fields["pagesize"]) if fields.get("pagesize") else None
        except ValueError:
            return envelope(failure("INVALID_DATA", "pagesize and pageoffset must be integers"))
        return envelope(await run_in_threadpool(sandbox.page, query_id, offset, pagesize))

    async def _write(version: str, object_name: str, request: Request, mode: str):
        try:
            records = await write_body(request)
        except (ValueError, UnicodeDecodeError) as exc:
            return envelope(failure("INVALID_DATA", f"The body could not be read: {exc}"))
        request.scope["sandbox.records"] = len(records) if isinstance(records, list) else 1   # for the latency
        id_param = request.query_params.get("idParam")
        return envelope(await run_in_threadpool(sandbox.write, object_name, records, mode, id_param,
                                                caller(request), version))

    @app.post("/api/{version}/vobjects/{object_name}")
    async def create_records(version: str, object_name: str, request: Request):
        return await _write(version, object_name, request, "create")

    @app.put("/api/{version}/vobjects/{object_name}")
    async def update_records(version: str, object_name: str, request: Request):
        return await _write(version, object_name, request, "update")

    @app.delete("/api/{version}/vobjects/{object_name}")
    async def delete_records(version: str, object_name: str, request: Request):
        return await _write(version, object_name, request, "delete")

    @app.get("/api/{version}/vobjects/{object_name}/{record_id}")
    async def get_record(version: str, object_name: str, record_id: str, request: Request):
        return envelope(await run_in_threadpool(sandbox.get_record, object_name, record_id, caller(request)))

    @app.delete("/api/{version}/vobjects/{object_name}/{record_id}")
    async def delete_record(version: str, object_name: str, record_id: str, request: Request):
        body = await run_in_threadpool(sandbox.write, object_name, [{"id": record_id}], "delete", None,
                                       caller(request), version)
        if body["responseStatus"] == "SUCCESS":
            body = body["data"][0]
        return envelope(body)

    @app.get("/api/{version}/objects/deletions/vobjects/{object_name}")
    async def deletions(version: str, object_name: str, request: Request):
        return envelope(await run_in_threadpool(sandbox.deletions, object_name, dict(request.query_params),
                                                version))

    @app.get("/api/{version}/metadata/vobjects")
    async def objects(version: str):
        return envelope({"responseStatus": "SUCCESS",
                         "objects": [{"name": o.name, "label": o.label,
                                      "url": f"/api/{version}/metadata/vobjects/{o.name}"}
                                     for o in sandbox.model.objects.values()]})

    @app.get("/api/{version}/metadata/vobjects/{object_name}")
    async def metadata(version: str, object_name: str):
        return envelope(sandbox.metadata(object_name))

    @app.get("/api/{version}/configuration/{component}")
    async def configuration(version: str, component: str):
        return envelope(sandbox.configuration(component))

    # -- sandbox administration (not Vault; needs a session, never counted) ----------------

    @app.get("/sandbox/counters")
    async def counters():
        return {"responseStatus": "SUCCESS", **sandbox.counters.snapshot(),
                "faults": dict(sandbox.faults.counts), "paging": dict(sandbox.paging),
                "burst": {"limit": sandbox.burst.limit, "remaining": sandbox.burst.remaining(),
                          "window_seconds": sandbox.burst.seconds}}

    @app.post("/sandbox/counters/reset")
    async def reset_counters():
        sandbox.counters.reset()
        sandbox.faults.counts.clear()
        sandbox.paging.clear()
        return {"responseStatus": "SUCCESS"}

    @app.get("/sandbox/faults")
    async def get_faults():
        return {"responseStatus": "SUCCESS", **sandbox.faults.describe()}

    @app.post("/sandbox/faults")
    async def set_faults(request: Request):
        spec = json.loads(await request.body() or b"{}")
        current = sandbox.faults.config
        kinds = spec.get("kinds", current.kinds)
        if isinstance(kinds, str):
            kinds = [k for k in kinds.split(",") if k]
        try:
            sandbox.faults.configure(FaultConfig(
                rate=float(spec.get("rate", current.rate)), kinds=list(kinds),
                seed=int(spec.get("seed", current.seed)),
                slow_seconds=float(spec.get("slow_seconds", current.slow_seconds)),
                queue=list(spec.get("queue", []))))
        except ValueError as exc:
            return envelope(failure("INVALID_DATA", str(exc)))
        return {"responseStatus": "SUCCESS", **sandbox.faults.describe()}

    @app.get("/sandbox/latency")
    async def get_latency():
        return {"responseStatus": "SUCCESS", **sandbox.latency.describe()}

    @app.post("/sandbox/latency")
    async def set_latency(request: Request):
        """{"profile": "none"|"vault"|file} replaces the profile, keys such as {"query_ms": 400}
        change the current one (it is then named "custom"), {"seed": n} restarts the jitter."""
        spec = json.loads(await request.body() or b"{}")
        try:
            profile = latency_profile(spec.pop("profile")) if "profile" in spec else sandbox.latency.profile
            seed = int(spec.pop("seed", sandbox.latency.seed))
            if spec:
                profile = replace(profile, name="custom", **latency_values(spec, "latency"))
        except (ValueError, TypeError) as exc:
            return envelope(failure("INVALID_DATA", str(exc)))
        sandbox.latency.configure(profile, seed)
        return {"responseStatus": "SUCCESS", **sandbox.latency.describe()}

    @app.get("/sandbox/downtime")
    async def get_downtime():
        return {"responseStatus": "SUCCESS", "minutes_left": sandbox.downtime.minutes_left()}

    @app.post("/sandbox/downtime")
    async def set_downtime(request: Request):
        """{"minutes": 30} (fractions accepted) or {"seconds": 2} starts a maintenance window now;
        {"minutes": 0} ends it."""
        spec = json.loads(await request.body() or b"{}")
        try:
            seconds = float(spec["seconds"]) if "seconds" in spec else float(spec.get("minutes", 0)) * 60
        except (TypeError, ValueError) as exc:
            return envelope(failure("INVALID_DATA", str(exc)))
        sandbox.downtime.start(seconds)
        return {"responseStatus": "SUCCESS", "minutes_left": sandbox.downtime.minutes_left()}

    @app.post("/sandbox/sessions/expire")
    async def expire_sessions(request: Request):
        spec = json.loads(await request.body() or b"{}")
        keep = None if spec.get("include_own", False) else request.state.session.session_id
        return {"responseStatus": "SUCCESS", "expired": sandbox.sessions.expire_all(except_id=keep)}

    def limits_body() -> dict:
        o = sandbox.options
        return {"responseStatus": "SUCCESS", "burst_limit": sandbox.burst.limit,
                "burst_window_seconds": sandbox.burst.seconds, "burst_delay_ms": o.burst_delay_ms,
                "auth_limit": sandbox.auth_window.limit, "auth_window_seconds": sandbox.auth_window.seconds,
                "session_idle_seconds": sandbox.sessions.idle_seconds,
                "session_max_seconds": sandbox.sessions.max_age_seconds,
                "page_size": o.page_size, "burst_remaining": sandbox.burst.remaining()}

    @app.get("/sandbox/limits")
    async def get_limits():
        return limits_body()

    @app.post("/sandbox/limits")
    async def set_limits(request: Request):
        spec = json.loads(await request.body() or b"{}")
        o = sandbox.options
        if "burst_limit" in spec:
            sandbox.burst.limit = int(spec["burst_limit"])
        if "burst_window_seconds" in spec:
            sandbox.burst.seconds = float(spec["burst_window_seconds"])
        if "burst_delay_ms" in spec:
            o.burst_delay_ms = int(spec["burst_delay_ms"])
        if "auth_limit" in spec:
            sandbox.auth_window.limit = int(spec["auth_limit"])
        if "auth_window_seconds" in spec:
            sandbox.auth_window.seconds = float(spec["auth_window_seconds"])
        if "session_idle_seconds" in spec:
            sandbox.sessions.idle_seconds = float(spec["session_idle_seconds"])
        if "session_max_seconds" in spec:
            sandbox.sessions.max_age_seconds = float(spec["session_max_seconds"])
        if "page_size" in spec:
            o.page_size = int(spec["page_size"])
        if spec.get("reset_windows"):
            sandbox.burst.reset()
            sandbox.auth_window.reset()
        return limits_body()

    return app


class DropConnections:
    """Outermost ASGI layer: closes the socket without an answer when a 'drop' fault was chosen.

    uvicorn answers 500 to an app that raises, so instead the transport behind uvicorn's own
    ``send`` is aborted; clients see a connection error, exactly like a dropped connection.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def guarded_send(message):
            if not scope.get("sandbox.drop"):
                return await send(message)
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is None:
                raise ConnectionAbortedError("injected fault: dropped connection")
            if not transport.is_closing():
                transport.abort()
                await asyncio.sleep(0)      # let uvicorn see the disconnect before it answers

        await self.app(scope, receive, guarded_send)


def build_asgi(app_name: str, db_path: str, options: Options | None = None):
    return DropConnections(create_app(app_name, db_path, options))
