"""Preflight: check a connection configuration against both vaults before activating it.

Every check is one line of the report (OK / FAIL / SKIP with the reason). Checked against each
vault's metadata API: every configured object and field exists with a compatible type, the
activity object types exist, channel-map, status and deletion values are valid picklist values,
idParam (external id) fields are unique, the identifier fields exist; and the integration users
have the permissions the enabled features need.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from clinical_crm.vault import VaultClient
from clinical_crm.config import ConnectionConfig
from clinical_crm.flows import build_all
from clinical_crm.flows.automated_activities import channel_field
from clinical_crm.flows.base import Flow
from clinical_crm.vault import Query
from clinical_crm.vault.errors import VaultAuthenticationError, VaultError, VaultTransientError


@dataclass(frozen=True)
class Check:
    side: str  # ctms | crm
    what: str
    status: str  # OK | FAIL | SKIP
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def line(self) -> str:
        return f"{self.status:<5} {self.side:<5} {self.what}" + (f": {self.reason}" if self.reason else "")


# Field types the role of a field allows (normalised metadata types).
TEXT = {"text", "long_text"}
REFERENCE = {"object"}
ROLE_TYPES: dict[str, set[str]] = {
    "date": {"date", "datetime"},
    "channel": {"picklist"},
    "visit_method": {"picklist"},
    "status": {"picklist"},
    "complete": {"boolean"},
    "update_required": {"boolean"},
    "send_to_clinical": {"boolean"},
    "external_id": {"text"},
    "study_country": REFERENCE | TEXT,  # a reference in CTMS, the country's name in CRM
    **{role: REFERENCE for role in ("person", "study", "site", "study_person", "monitoring_event",
                                   "communication_log", "account")},
}

_TYPE_NAMES = {"string": "text", "longtext": "long_text", "richtext": "long_text"}


def _normal_type(field: dict) -> str:
    raw = str(field.get("type", "")).lower()
    return _TYPE_NAMES.get(raw, raw)


class VaultCatalog:
    """Metadata of one vault, fetched once per object / picklist."""

    def __init__(self, client: VaultClient):
        self.client = client
        self._objects: dict[str, dict | VaultError] = {}
        self._picklists: dict[str, list[str]] = {}

    def object(self, name: str) -> dict:
        """The object's metadata; raises VaultError when Vault does not know the object."""
        if name not in self._objects:
            try:
                self._objects[name] = self.client.object_metadata(name)
            except (VaultAuthenticationError, VaultTransientError):
                raise
            except VaultError as exc:
                self._objects[name] = exc
        found = self._objects[name]
        if isinstance(found, VaultError):
            raise found
        return found

    def field(self, object_name: str, field_name: str) -> dict | None:
        for field in self.object(object_name).get("fields", []):
            if field.get("name") == field_name:
                return field
        return None

    def object_types(self, object_name: str) -> set[str]:
        meta = self.object(object_name)
        types = meta.get("object_types") or meta.get("objectTypes") or []
        return {t if isinstance(t, str) else t.get("api_name", t.get("name")) for t in types}

    def picklist_values(self, object_name: str, field_name: str) -> set[str] | None:
        field = self.field(object_name, field_name) or {}
        inline = field.get("picklist_values") or field.get("picklistValues")
        if inline:
            return {v if isinstance(v, str) else v.get("name") for v in inline}
        picklist: Any = field.get("picklist")
        if not picklist:
            return None
        if isinstance(picklist, dict):
            picklist = picklist.get("name")
        if picklist not in self._picklists:
            self._picklists[picklist] = self.client.picklist_values(picklist)
        return set(self._picklists[picklist])


class Section(Protocol):
    """A configuration section that names one Vault object (the `*Object` models of config.py)."""

    object: str


def _roles(fields: BaseModel) -> Iterator[tuple[str, str]]:
    """(YAML key, API name) of every field role of a section."""
    for attribute, info in type(fields).model_fields.items():
        yield info.alias or attribute, getattr(fields, attribute)


class SideChecks:
    """The checks of one vault (side = "ctms" or "crm")."""

    def __init__(self, side: str, catalog: VaultCatalog):
        self.side = side
        self.catalog = catalog
        self.checks: list[Check] = []

    def add(self, what: str, ok: bool, reason: str = "") -> bool:
        self.checks.append(Check(self.side, what, "OK" if ok else "FAIL", reason))
        return ok

    def skip(self, what: str, reason: str) -> None:
        self.checks.append(Check(self.side, what, "SKIP", reason))

    def object_exists(self, key: str, object_name: str) -> bool:
        try:
            meta = self.catalog.object(object_name)
        except VaultError as exc:
            return self.add(f"object {object_name} ({key}.object)", False, f"not found in the vault ({exc})")
        return self.add(f"object {object_name} ({key}.object)", True, meta.get("label", ""))

    def field_ok(self, key: str, object_name: str, field_name: str, role: str, unique: bool = False) -> bool:
        what = f"field {object_name}.{field_name} ({key})"
        field = self.catalog.field(object_name, field_name)
        if field is None:
            return self.add(what, False, f"{object_name} has no field {field_name}")
        kind = _normal_type(field)
        allowed = ROLE_TYPES.get(role, TEXT)
        if kind not in allowed:
            return self.add(what, False, f"is {kind}, expected {' or '.join(sorted(allowed))}")
        if unique and not field.get("unique"):
            return self.add(what, False, "must be unique to serve as idParam (external id)")
        return self.add(what, True, kind + (", unique" if unique else ""))

    def section(self, key: str, section: Section, unique_roles: tuple[str, ...] = ("external_id",)) -> bool:
        """The object of a configuration section and all its fields."""
        if not self.object_exists(key, section.object):
            return False
        ok = True
        fields = getattr(section, "fields", None)
        if fields is not None:
            for role, field_name in _roles(fields):
                ok &= self.field_ok(f"{key}.fields.{role}", section.object, field_name, role,
                                    unique=role in unique_roles)
        return ok

    def values_in_picklist(self, what: str, object_name: str, field_name: str, values: list[str]) -> None:
        try:
            allowed = self.catalog.picklist_values(object_name, field_name)
        except VaultError as exc:
            self.add(what, False, f"cannot read the picklist of {object_name}.{field_name} ({exc})")
            return
        if allowed is None:
            self.add(what, False, f"{object_name}.{field_name} is not a picklist")
            return
        missing = [v for v in values if v not in allowed]
        if missing:
            self.add(what, False, f"not values of {object_name}.{field_name}: {', '.join(missing)} "
                                  f"(valid: {', '.join(sorted(allowed))})")
        else:
            self.add(what, True, f"{len(values)} value(s) valid for {object_name}.{field_name}")

    def object_type_active(self, object_name: str, type_name: str, key: str) -> None:
        """An object type an admin must activate (Medical Activity: Admin > Configuration >
        Objects > Activity > Object Types), read from Vault's configuration API."""
        what = f"object type {object_name}.{type_name} ({key}) is active"
        try:
            found = self.catalog.client.object_type(object_name, type_name)
        except VaultError as exc:
            self.add(what, False, f"not found ({exc}): an admin must create and activate it")
            return
        active = found.get("active")
        if active is None:
            self.skip(what, "the vault does not say whether it is active")
        else:
            self.add(what, bool(active), "active" if active else
                     f"{found.get('label') or type_name} is inactive: an admin activates it under Admin > "
                     "Configuration > Objects > Activity > Object Types")

    def permissions(self, object_name: str, rights: set[str], object_types: dict[str, set[str]] | None = None) -> None:
        what = f"permissions on {object_name} ({', '.join(sorted(rights))})"
        try:
            granted = self.catalog.client.my_permissions(object_name)
        except VaultError as exc:
            self.add(what, False, f"cannot read the integration user's permissions ({exc})")
            return
        missing = sorted(r for r in rights if not granted.get(r))
        self.add(what, not missing, f"missing: {', '.join(missing)}" if missing else "granted")
        for type_name, type_rights in (object_types or {}).items():
            what = f"permissions on {object_name} object type {type_name} ({', '.join(sorted(type_rights))})"
            by_type = granted.get("object_types") or {}
            if type_name not in by_type:
                # no object-type level entry: the object level permissions apply
                missing = sorted(r for r in type_rights if not granted.get(r))
            else:
                missing = sorted(r for r in type_rights if not by_type[type_name].get(r))
            self.add(what, not missing, f"missing: {', '.join(missing)}" if missing else "granted")


def check_ctms(cfg: ConnectionConfig, catalog: VaultCatalog) -> list[Check]:
    side = SideChecks("ctms", catalog)
    ctms, features = cfg.ctms, cfg.features
    for key in ("user", "person", "study", "study_country", "site", "study_person", "activity",
                "monitoring_event", "communication_log"):
        section = getattr(ctms, key)
        if section is not None:
            side.section(f"ctms.{key}", section)
    activity = ctms.activity
    if _object_known(catalog, activity.object):
        types = catalog.object_types(activity.object)
        for key in ("clinical_type", "medical_type"):
            name = getattr(activity, key)
            side.add(f"object type {activity.object}.{name} (ctms.activity.{key})", name in types,
                     "" if name in types else
                     f"not an object type of {activity.object} (has: {', '.join(sorted(types)) or 'none'})")
        if _field_known(catalog, activity.object, activity.fields.channel):
            side.values_in_picklist("channel_map keys (CTMS channels)", activity.object,
                                    activity.fields.channel, list(cfg.channel_map))
        status_values = (catalog.picklist_values(activity.object, "status__v")
                         if catalog.field(activity.object, "status__v") else None)
        if status_values is None:
            side.skip(f"deletion.ctms_inactive_status {cfg.deletion.ctms_inactive_status}",
                      f"{activity.object}.status__v has no picklist in the metadata; not checked")
        else:
            side.values_in_picklist("deletion.ctms_inactive_status", activity.object, "status__v",
                                    [cfg.deletion.ctms_inactive_status])
    if features.medical_activities and _object_known(catalog, activity.object):
        side.object_type_active(activity.object, activity.medical_type, "ctms.activity.medical_type")
    if features.automated_activities:
        for key in ("monitoring_event", "communication_log"):
            section = getattr(ctms, key)
            channel = channel_field(section.fields)
            if _field_known(catalog, section.object, channel):
                side.values_in_picklist(f"channel_map keys on ctms.{key}", section.object, channel,
                                        list(cfg.channel_map))
        # Veeva: every Monitoring Event type used for automation needs these two fields
        event = ctms.monitoring_event
        if event is not None and _object_known(catalog, event.object):
            for label, field_name in (("Activity Update Required", event.fields.update_required),
                                      ("Monitoring Visit Method", event.fields.visit_method)):
                present = catalog.field(event.object, field_name) is not None
                side.add(f"automated activities need {label} on {event.object}", present,
                         f"field {field_name}" if present else
                         f"{event.object} has no field {field_name} ({label}): add it to every Monitoring Event "
                         f"type used for automated activities, or set features.automated_activities: false")
    if _object_known(catalog, ctms.person.object):
        side.field_ok("identifiers.ctms_person_field", ctms.person.object, cfg.identifiers.ctms_person_field,
                      "identifier")

    # object types of the Activity object: which types the flows read and write
    type_rights: dict[str, set[str]] = {}
    if features.clinical_activities:
        type_rights[activity.clinical_type] = {"read"}
    if features.automated_activities:
        type_rights[activity.clinical_type] = {"read", "create", "edit"}
    if features.medical_activities:
        type_rights[activity.medical_type] = {"read", "create", "edit"}
    for object_name, rights in flow_permissions(build_all(cfg), "ctms", catalog).items():
        side.permissions(object_name, rights, type_rights if object_name == activity.object else None)
    return side.checks


def check_crm(cfg: ConnectionConfig, catalog: VaultCatalog) -> list[Check]:
    side = SideChecks("crm", catalog)
    crm, features = cfg.crm, cfg.features
    for key in ("user", "account", "call", "clinical_study", "clinical_site", "interaction"):
        section = getattr(crm, key)
        if section is not None:
            side.section(f"crm.{key}", section)
    if _object_known(catalog, crm.account.object):
        side.field_ok("identifiers.crm_account_field", crm.account.object, cfg.identifiers.crm_account_field,
                      "identifier")
    channel_values = list(cfg.channel_map.values())
    status_values = [cfg.status.submitted, cfg.status.planned]
    for key in ("interaction", "call"):
        section = getattr(crm, key)
        if _field_known(catalog, section.object, section.fields.channel):
            side.values_in_picklist(f"channel_map values on crm.{key}", section.object, section.fields.channel,
                                    channel_values)
        if _field_known(catalog, section.object, section.fields.status):
            side.values_in_picklist(f"status values on crm.{key}", section.object, section.fields.status, status_values)
    if features.studies_and_sites:
        for key in ("clinical_study", "clinical_site"):
            section = getattr(crm, key)
            if not _object_known(catalog, section.object):
                continue
            if side.field_ok(f"deletion.crm_status_field on crm.{key}", section.object,
                             cfg.deletion.crm_status_field, "status"):
                side.values_in_picklist(f"deletion statuses on crm.{key}", section.object,
                                        cfg.deletion.crm_status_field,
                                        [cfg.deletion.crm_deleted_status, cfg.deletion.crm_active_status])

    for object_name, rights in flow_permissions(build_all(cfg), "crm", catalog).items():
        side.permissions(object_name, rights)
    return side.checks


def flow_permissions(flows: list[Flow], side: str, catalog: VaultCatalog) -> dict[str, set[str]]:
    """{object: rights} the integration user of one vault needs, derived from what the flows
    declare: read what they read (and the objects their queries reach through relationship
    fields, as the metadata says), read and edit what they mark deleted, read, create and edit
    what they write; a pre-step also edits its source records (it clears their flags)."""
    need: dict[str, set[str]] = {}

    def add(object_name: str, *rights: str) -> None:
        need.setdefault(object_name, set()).update(rights)

    for flow in flows:
        for read in flow.reads:
            if read.side != side:
                continue
            query = getattr(read, "query", None)
            object_name = query.object if query is not None else getattr(read, "object", None)
            if object_name:
                add(object_name, "read")
            for related in _related_objects(catalog, query) if query is not None else ():
                add(related, "read")
        if flow.target_side == side:
            for target in flow.targets:
                add(target.target_object, "read", "create", "edit")
            for mark in flow.deletions:
                add(mark.target_object, "read", "edit")
        if flow.pre_step is not None and flow.source_side == side:
            for object_name in flow.pre_step.source_objects:
                add(object_name, "read", "edit")
            add(flow.pre_step.object, "read", "create", "edit")
    return need


def _related_objects(catalog: VaultCatalog, query: Query) -> set[str]:
    """The objects a query reads through relationship fields (`person__vr.email__sys`: the object
    that `person__v` refers to), as the vault's metadata says; none where it does not know them."""
    found: set[str] = set()
    if not _object_known(catalog, query.object):
        return found
    for name in query.fields:
        if "." not in name:
            continue
        field = catalog.field(query.object, name.split(".", 1)[0].removesuffix("r")) or {}
        target = field.get("object")
        target_name = target.get("name") if isinstance(target, dict) else target
        if target_name:
            found.add(str(target_name))
    return found


def _object_known(catalog: VaultCatalog, object_name: str) -> bool:
    try:
        catalog.object(object_name)
        return True
    except VaultError:
        return False


def _field_known(catalog: VaultCatalog, object_name: str, field_name: str) -> bool:
    return _object_known(catalog, object_name) and catalog.field(object_name, field_name) is not None


def check_side(side: str, conn_id: str, cfg: ConnectionConfig, get_client: Callable[[str], VaultClient],
               checks: Callable[[ConnectionConfig, VaultCatalog], list[Check]]) -> list[Check]:
    """Connect (one check), then run the side's checks; a side that cannot connect stops there."""
    what = f"connection {conn_id}"
    try:
        client = get_client(conn_id)
        vault_id = client.vault_id
    except Exception as exc:  # a missing Airflow connection, bad credentials, vault down
        return [Check(side, what, "FAIL", f"{type(exc).__name__}: {exc}")]
    try:
        result = [Check(side, what, "OK", f"authenticated as {client.username} to vault {vault_id}")]
        try:
            result += checks(cfg, VaultCatalog(client))
        except VaultError as exc:
            result.append(Check(side, "metadata", "FAIL", f"stopped: {exc}"))
        return result
    finally:
        client.close()


def run_preflight(cfg: ConnectionConfig, get_client: Callable[[str], VaultClient]) -> list[Check]:
    """All checks of a configuration; `get_client(conn_id)` gives a client for an Airflow connection id."""
    return (check_side("ctms", cfg.ctms_conn_id, cfg, get_client, check_ctms)
            + check_side("crm", cfg.crm_conn_id, cfg, get_client, check_crm))


def report(cfg: ConnectionConfig, checks: list[Check]) -> str:
    failed = sum(c.failed for c in checks)
    lines = [f"Preflight of connection {cfg.name!r} ({cfg.source_file})"]
    lines += [c.line() for c in checks]
    lines.append(f"{len(checks)} checks, {failed} failed: "
                 + ("NOT ready to activate" if failed else "ready to activate"))
    return "\n".join(lines)
