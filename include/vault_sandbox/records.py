"""Record writes and reads with Vault's rules: validation, standard fields, per-record results."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import select

from vault_sandbox.db import DELETIONS, Store, now_text
from vault_sandbox.models import FieldDef, ObjectDef
from vault_sandbox.vql import VqlError, normalise_datetime

MAX_BATCH = 500


class RecordError(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


@dataclass
class Caller:
    user_id: str
    profile: str


def _real_date(value: str) -> bool:
    """'2026-13-45' has the shape of a date but is none (Vault refuses it)."""
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


def failure(error_type: str, message: str) -> dict:
    return {"responseStatus": "FAILURE", "errors": [{"type": error_type, "message": message}]}


def record_url(version: str, object_name: str, record_id: str) -> str:
    return f"/api/{version}/vobjects/{object_name}/{record_id}"


def to_output(obj: ObjectDef, store: Store, row: dict) -> dict:
    """A stored row as Vault returns it: picklists as one-element arrays, booleans as JSON booleans."""
    out = {}
    for name, f in obj.fields.items():
        out[name] = output_value(f, row.get(name))
    return out


def output_value(f: FieldDef, value: Any) -> Any:
    if value is None:
        return [] if f.type == "picklist" else None
    if f.type == "picklist":
        return [value]
    if f.type == "boolean":
        return bool(value)
    return value


def _chunks(values: list, size: int = 400) -> Iterator[list]:
    """Slices small enough for one IN (...) under SQLite's bound-parameter limit."""
    for start in range(0, len(values), size):
        yield values[start:start + size]


class Writer:
    """Applies one write call. Every record gets a result, in input order."""

    def __init__(self, store: Store, obj: ObjectDef, caller: Caller, version: str,
                 race: Callable[[], bool] = lambda: False, inactive_types: frozenset[str] = frozenset()):
        self.store = store
        self.model = store.model
        self.obj = obj
        self.table = store.table(obj.name)
        self.caller = caller
        self.version = version
        self.race = race          # fault injection: True fails this record with RACE_CONDITION
        self.inactive_types = inactive_types     # ids of object types no admin has activated
        # Per-call caches that keep a 500-record call to a handful of statements.
        self._ids: list[str] = []                      # pre-allocated record ids
        self._known: dict[str, set[str]] = {}          # referenced ids known to exist, per object
        self._by_unique: dict[tuple[str, str], dict[str, str]] = {}  # (object, unique field) -> value -> id
        self._pending: list[dict] = []                 # created rows not yet inserted

    def _prefetch_references(self, conn, records: list) -> None:
        """Resolve the batch's references in a few IN queries: by id (`study__v`) and by a unique
        field of the target (`study__vr.external_id__v`), instead of one query per record."""
        wanted: dict[str, set[str]] = {}
        wanted_unique: dict[tuple[str, str], set[str]] = {}
        for record in records:
            if not isinstance(record, dict):
                continue
            for key, value in record.items():
                if not isinstance(value, str) or not value:
                    continue
                if "." in key:
                    rel, target_field = key.split(".", 1)
                    f = self.obj.by_relationship(rel) or self.obj.fields.get(rel)
                    if f is not None and f.type == "object" and f.object != "object_type__v":
                        target = self.model.objects[f.object].fields.get(target_field)
                        if target is not None and target.unique:
                            wanted_unique.setdefault((f.object, target_field), set()).add(value)
                    continue
                f = self.obj.fields.get(key)
                if f is not None and f.type == "object" and f.object != "object_type__v":
                    wanted.setdefault(f.object, set()).add(value)
        for object_name, values in wanted.items():
            table = self.store.table(object_name)
            found = self._known.setdefault(object_name, set())
            for chunk in _chunks(sorted(values)):
                found.update(conn.execute(select(table.c.id).where(table.c.id.in_(chunk))).scalars())
        for (object_name, field_name), values in wanted_unique.items():
            table = self.store.table(object_name)
            ids = self._by_unique.setdefault((object_name, field_name), {})
            for chunk in _chunks(sorted(values)):
                rows = conn.execute(select(table.c[field_name], table.c.id).where(table.c[field_name].in_(chunk)))
                ids.update((value, record_id) for value, record_id in rows)

    def _new_id(self, conn, remaining: int) -> str:
        if not self._ids:
            self._ids = self.store.allocate_ids(conn, self.obj.prefix, max(1, remaining))
        return self._ids.pop(0)

    def _flush(self, conn) -> None:
        if self._pending:
            conn.execute(self.table.insert(), self._pending)
            self._pending = []

    # -- values ---------------------------------------------------------------------------

    def _lookup_by_unique(self, conn, object_name: str, field_name: str, value: Any) -> str | None:
        target = self.model.objects[object_name]
        tf = target.fields.get(field_name)
        if tf is None or not tf.unique:
            raise RecordError("INVALID_DATA", f"'{field_name}' is not a unique field of {object_name}")
        prefetched = self._by_unique.get((object_name, field_name))
        if prefetched is not None and value in prefetched:
            return prefetched[value]
        table = self.store.table(object_name)
        return conn.execute(select(table.c.id).where(table.c[field_name] == value)).scalar()

    def _coerce(self, conn, f: FieldDef, value: Any) -> Any:
        if value is None or value == "" or value == []:
            return None
        if f.type == "picklist":
            if isinstance(value, list):
                if len(value) != 1:
                    raise RecordError("INVALID_DATA", f"Picklist field '{f.name}' takes one value")
                value = value[0]
            if value not in self.model.picklist_values(f):
                raise RecordError("INVALID_DATA", f"Invalid value '{value}' for picklist field '{f.name}'")
            return value
        if f.type == "boolean":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise RecordError("INVALID_DATA", f"Invalid boolean '{value}' for field '{f.name}'")
        if f.type == "number":
            try:
                return float(value)
            except (TypeError, ValueError):
                raise RecordError("INVALID_DATA", f"Invalid number '{value}' for field '{f.name}'") from None
        if f.type == "date":
            if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) or not _real_date(value):
                raise RecordError("INVALID_DATA", f"Invalid date '{value}' for field '{f.name}' (YYYY-MM-DD)")
            return value
        if f.type == "datetime":
            try:
                return normalise_datetime(str(value))
            except VqlError:
                raise RecordError("INVALID_DATA", f"Invalid datetime '{value}' for field '{f.name}'") from None
        if f.type == "object":
            value = str(value)
            if f.object == "object_type__v":
                if value not in self.store.object_type_names or self.store.object_type_names[value][0] != self.obj.name:
                    raise RecordError("INVALID_DATA", f"Invalid object type id '{value}'")
                return value
            if value in self._known.get(f.object, ()):
                return value
            target = self.store.table(f.object)
            if conn.execute(select(target.c.id).where(target.c.id == value)).scalar() is None:
                raise RecordError("INVALID_DATA", f"Field '{f.name}' references a record that does not exist: "
                                                  f"{f.object} '{value}'")
            return value
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise RecordError("INVALID_DATA", f"Invalid text value for field '{f.name}'")
        value = str(value)
        if f.max_length and len(value) > f.max_length:
            raise RecordError("INVALID_DATA", f"Value of '{f.name}' is longer than {f.max_length} characters")
        return value

    def _values(self, conn, record: dict, id_param: str | None) -> dict:
        """Input record -> column values; raises RecordError(INVALID_DATA) for anything Vault refuses."""
        values: dict[str, Any] = {}
        for key, raw in record.items():
            if key in ("id", id_param):
                continue
            if key in ("object_type__v.api_name__v", "object_type__vr.api_name__v"):
                type_id = self.store.object_type_id(self.obj.name, str(raw))
                if type_id is None:
                    raise RecordError("INVALID_DATA", f"Unknown object type '{raw}' for {self.obj.name}")
                values.setdefault("object_type__v", type_id)
                continue
            if "." in key:
                rel, target_field = key.split(".", 1)
                f = self.obj.by_relationship(rel) or (self.obj.fields.get(rel) if rel in self.obj.fields else None)
                if f is None or f.type != "object" or f.object == "object_type__v":
                    raise RecordError("INVALID_DATA", f"Unknown field '{key}' on {self.obj.name}")
                if raw in (None, ""):
                    values[f.name] = None
                    continue
                found = self._lookup_by_unique(conn, f.object, target_field, str(raw))
                if found is None:
                    raise RecordError("INVALID_DATA", f"No {f.object} record has {target_field} = '{raw}' "
                                                      f"(field '{key}')")
                values[f.name] = found
                continue
            f = self.obj.fields.get(key)
            if f is None:
                raise RecordError("INVALID_DATA", f"Unknown field '{key}' on {self.obj.name}")
            if not f.editable:
                raise RecordError("INVALID_DATA", f"Field '{key}' is not editable")
            values[key] = self._coerce(conn, f, raw)
        return values

    def _check_required(self, merged: dict) -> None:
        type_name = self.store.object_type_names.get(merged.get("object_type__v"), (None, None))[1]
        for f in self.obj.fields.values():
            needed = f.required or (type_name in f.required_for_types)
            if needed and merged.get(f.name) in (None, ""):
                why = f" for object type {type_name}" if not f.required else ""
                raise RecordError("INVALID_DATA", f"Missing required field '{f.name}'{why}")

    def _check_unique(self, conn, values: dict, record_id: str | None, known_absent: str | None = None) -> None:
        for name, value in values.items():
            f = self.obj.fields[name]
            if f.unique and value is not None and name != known_absent:
                self._flush(conn)   # earlier records of this call must be visible to the check
                other = conn.execute(select(self.table.c.id).where(self.table.c[name] == value)).scalar()
                if other is not None and other != record_id:
                    raise RecordError("INVALID_DATA", f"Duplicate value '{value}' for unique field '{name}' "
                                                      f"(record {other})")

    def _check_active(self, *type_ids: str | None) -> None:
        """Records of an object type an admin has not activated cannot be created or changed."""
        for type_id in type_ids:
            if type_id in self.inactive_types:
                name = f"{self.obj.name}.{self.store.object_type_names[type_id][1]}"
                raise RecordError("INVALID_DATA", f"Object type '{name}' is inactive: an admin must activate it "
                                                  f"before records of it can be created or changed")

    def _check_access(self, right: str, type_id: str | None) -> None:
        type_name = self.store.object_type_names.get(type_id, (None, None))[1]
        if right not in self.model.permissions(self.caller.profile, self.obj.name, type_name):
            what = f"{self.obj.name} records of object type {type_name}" if type_name else f"{self.obj.name} records"
            raise RecordError("INSUFFICIENT_ACCESS", f"You do not have permission to {right} {what}")

    # -- operations -----------------------------------------------------------------------

    def _create(self, conn, values: dict, known_absent: str | None = None) -> dict:
        values.setdefault("object_type__v", self.store.object_type_id(self.obj.name, self.obj.default_type))
        self._check_active(values["object_type__v"])
        self._check_access("create", values["object_type__v"])
        self._check_required(values)
        self._check_unique(conn, values, None, known_absent)
        record_id = self._new_id(conn, self._remaining)
        stamp = now_text()
        row = {f: None for f in self.obj.fields}
        row.update(values)
        row.update(id=record_id, global_id__sys=self.store.global_id(record_id), created_by__v=self.caller.user_id,
                   modified_by__v=self.caller.user_id, created_date__v=stamp, modified_date__v=stamp)
        row["status__v"] = row.get("status__v") or "active__v"
        row["name__v"] = row.get("name__v") or record_id    # system-managed name when none is given
        self._pending.append(row)
        return self._success(record_id, "created")

    def _update(self, conn, existing: dict, values: dict) -> dict:
        self._check_active(existing["object_type__v"], values.get("object_type__v"))
        self._check_access("edit", existing["object_type__v"])
        if "object_type__v" in values and values["object_type__v"] != existing["object_type__v"]:
            self._check_access("edit", values["object_type__v"])
        changes = {k: v for k, v in values.items() if existing.get(k) != v}
        merged = {**existing, **values}
        self._check_required(merged)
        self._check_unique(conn, changes, existing["id"])
        if not changes:
            # A no-op update leaves modified_date__v where it was.
            result = self._success(existing["id"], "updated")
            result["responseStatus"] = "WARNING"
            result["warnings"] = [{"warning_type": "NO_DATA_CHANGES",
                                   "message": "No changes in values - record not updated"}]
            return result
        changes.update(modified_by__v=self.caller.user_id, modified_date__v=now_text())
        conn.execute(self.table.update().where(self.table.c.id == existing["id"]).values(**changes))
        return self._success(existing["id"], "updated")

    def _success(self, record_id: str, operation: str) -> dict:
        return {"responseStatus": "SUCCESS",
                "data": {"id": record_id, "url": record_url(self.version, self.obj.name, record_id),
                         # Sandbox extension (not in Vault's documented response): created or updated.
                         "operation": operation}}

    def _existing(self, conn, field_name: str, keys: list) -> dict[Any, dict]:
        rows: dict[Any, dict] = {}
        for chunk in _chunks([k for k in keys if k is not None]):
            for row in conn.execute(select(self.table).where(self.table.c[field_name].in_(chunk))).mappings():
                rows[row[field_name]] = dict(row)
        return rows

    def write(self, records: list[dict], mode: str, id_param: str | None = None) -> list[dict]:
        """mode: create (upsert when id_param), update, delete. Runs inside one transaction."""
        key_field = id_param or "id"
        if id_param and id_param != "id":
            f = self.obj.fields.get(id_param)
            if f is None or not f.unique:
                raise RecordError("INVALID_DATA", f"idParam '{id_param}' is not a unique field of {self.obj.name}")
        keyed = mode in ("update", "delete") or id_param is not None
        if keyed:
            keys = [r.get(key_field) if isinstance(r, dict) else None for r in records]
            seen = set()
            for k in keys:
                if k is not None and k in seen:
                    raise RecordError("INVALID_DATA", f"Duplicate {key_field} value '{k}' in the batch: "
                                                      f"no records were processed")
                seen.add(k)
        results = []
        with self.store.write_lock, self.store.engine.begin() as conn:
            existing = self._existing(conn, key_field, [str(k) for k in keys if k is not None]) if keyed else {}
            self._prefetch_references(conn, records)
            for position, record in enumerate(records):
                self._remaining = len(records) - position
                try:
                    if not isinstance(record, dict):
                        raise RecordError("INVALID_DATA", "Each record must be an object")
                    if self.race():
                        raise RecordError("RACE_CONDITION", "The record was modified by another request; "
                                                            "try again")
                    results.append(self._apply(conn, record, mode, key_field, id_param, existing))
                except RecordError as exc:
                    results.append({"responseStatus": "FAILURE",
                                    "errors": [{"type": exc.error_type, "message": exc.message}]})
            self._flush(conn)
        return results

    def _apply(self, conn, record: dict, mode: str, key_field: str, id_param: str | None, existing: dict) -> dict:
        key = record.get(key_field)
        if mode == "create" and id_param is None:
            if "id" in record:
                raise RecordError("INVALID_DATA", "Field 'id' cannot be set on create")
            return self._create(conn, self._values(conn, record, None))
        if key in (None, ""):
            raise RecordError("PARAMETER_REQUIRED" if key_field == "id" else "INVALID_DATA",
                              f"Missing '{key_field}'")
        current = existing.get(str(key))
        if current is None and mode == "create":
            # Upsert by a unique field that no record holds yet: create, keeping the key value.
            values = self._values(conn, record, id_param)
            if id_param != "id":
                values[id_param] = self._coerce(conn, self.obj.fields[id_param], key)
            else:
                raise RecordError("INVALID_DATA", f"No {self.obj.name} record has id '{key}'")
            # Absent from the store (looked up above) and unique within the call (checked above).
            return self._create(conn, values, known_absent=id_param)
        if current is None:
            raise RecordError("INVALID_DATA", f"No {self.obj.name} record has {key_field} '{key}'")
        if mode == "delete":
            self._check_access("delete", current["object_type__v"])
            conn.execute(self.table.delete().where(self.table.c.id == current["id"]))
            conn.execute(self.store.table(DELETIONS).insert().values(
                object_name=self.obj.name, id=current["id"], global_id__sys=current["global_id__sys"],
                link__sys=current.get("link__sys"), date_deleted=now_text()))
            existing.pop(str(key), None)
            return {"responseStatus": "SUCCESS", "data": {"id": current["id"]}}
        return self._update(conn, current, self._values(conn, record, id_param))
