"""Object models of the sandbox vaults, loaded from the YAML files next to this module.

The YAML is the contract other parts code against; this module only reads it and adds
the standard fields every Vault object carries.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from pathlib import Path

import yaml

MODELS_DIR = Path(__file__).resolve().parent

VAULT_IDS = {"ctms": "1001", "crm": "2002"}     # default vault ids (`serve --vault-id` overrides them)
VAULT_DIGIT = {"ctms": "1", "crm": "2"}

STANDARD_STATUS = {"active__v": "Active", "inactive__v": "Inactive"}

# Suffix of a reference field -> suffix of its relationship name.
RELATIONSHIP_SUFFIXES = [("__clin", "__clinr"), ("__ctms", "__ctmsr"), ("__sys", "__sysr"),
                         ("__v", "__vr"), ("__c", "__cr")]


def relationship_name(field_name: str) -> str:
    for suffix, rel_suffix in RELATIONSHIP_SUFFIXES:
        if field_name.endswith(suffix):
            return field_name[: -len(suffix)] + rel_suffix
    raise ValueError(f"{field_name} has no relationship suffix")


@dataclass
class FieldDef:
    name: str
    type: str                       # id, text, long_text, picklist, object, boolean, date, datetime, number
    label: str = ""
    required: bool = False
    unique: bool = False
    max_length: int | None = None
    picklist: str | None = None
    object: str | None = None       # target object of a reference field
    required_for_types: list[str] = field(default_factory=list)
    editable: bool = True
    standard: bool = False

    @property
    def relationship(self) -> str | None:
        return relationship_name(self.name) if self.type == "object" else None


@dataclass
class ObjectDef:
    name: str
    label: str
    prefix: str                     # 3-character id prefix
    fields: dict[str, FieldDef]
    object_types: dict[str, str]    # api name -> label

    @property
    def default_type(self) -> str:
        return next(iter(self.object_types))

    def by_relationship(self, rel: str) -> FieldDef | None:
        return self._relationships.get(rel)

    @cached_property
    def _relationships(self) -> dict[str, FieldDef]:
        return {f.relationship: f for f in self.fields.values() if f.relationship}


@dataclass
class VaultModel:
    app: str
    label: str
    vault_id: str
    picklists: dict[str, dict[str, str]]
    objects: dict[str, ObjectDef]
    security_profiles: dict[str, dict]

    def picklist_values(self, f: FieldDef) -> dict[str, str]:
        if f.name == "status__v" and f.standard:
            return STANDARD_STATUS
        return self.picklists[f.picklist]

    def permissions(self, profile: str, object_name: str, object_type: str | None = None) -> set[str]:
        """Rights of a security profile on an object, or on one of its object types."""
        spec = self.security_profiles.get(profile) or {}
        objects = spec.get("objects") or {}
        rights = set(objects.get(object_name, objects.get("*", [])))
        if object_type is not None:
            types = (spec.get("object_types") or {}).get(object_name)
            if types is not None and object_type in types:
                rights = set(types[object_type])
        return rights


def _standard_fields(object_name: str) -> dict[str, FieldDef]:
    return {
        "id": FieldDef("id", "id", "ID", unique=True, editable=False, standard=True),
        "object_type__v": FieldDef("object_type__v", "object", "Object Type", object="object_type__v", standard=True),
        "global_id__sys": FieldDef("global_id__sys", "text", "Global ID", unique=True, editable=False, standard=True,
                                   max_length=100),
        "link__sys": FieldDef("link__sys", "text", "Link", max_length=100, standard=True),
        "name__v": FieldDef("name__v", "text", "Name", max_length=128, standard=True),
        "status__v": FieldDef("status__v", "picklist", "Status", picklist="status__v", standard=True),
        "created_by__v": FieldDef("created_by__v", "object", "Created By", object="user__sys", editable=False,
                                  standard=True),
        "created_date__v": FieldDef("created_date__v", "datetime", "Created Date", editable=False, standard=True),
        "modified_by__v": FieldDef("modified_by__v", "object", "Last Modified By", object="user__sys",
                                   editable=False, standard=True),
        "modified_date__v": FieldDef("modified_date__v", "datetime", "Last Modified Date", editable=False,
                                     standard=True),
    }


def load_model(app: str, vault_id: int | str | None = None) -> VaultModel:
    """The model of one vault; `vault_id` replaces the app's default id (what auth reports and
    what global ids start with)."""
    model = _load_yaml_model(app)
    return model if vault_id is None else replace(model, vault_id=str(vault_id))


@cache
def _load_yaml_model(app: str) -> VaultModel:
    if app not in VAULT_IDS:
        raise ValueError(f"unknown app {app!r}: expected ctms or crm")
    raw = yaml.safe_load((MODELS_DIR / f"{app}.yaml").read_text())
    objects: dict[str, ObjectDef] = {}
    for index, (name, spec) in enumerate(raw["objects"].items()):
        fields = _standard_fields(name)
        for fname, fspec in (spec.get("fields") or {}).items():
            fields[fname] = FieldDef(
                name=fname,
                type=fspec["type"],
                label=fspec.get("label", fname),
                required=bool(fspec.get("required", False)),
                unique=bool(fspec.get("unique", False)),
                max_length=fspec.get("max_length"),
                picklist=fspec.get("picklist"),
                object=fspec.get("object"),
                required_for_types=list(fspec.get("required_for_types") or []),
            )
        # Vault-style ids: "V" + vault digit + one letter per object, e.g. V1A0000000000042.
        prefix = f"V{VAULT_DIGIT[app]}{chr(ord('A') + index)}"
        object_types = dict(spec.get("object_types") or {"base__v": spec.get("label", name)})
        objects[name] = ObjectDef(name, spec.get("label", name), prefix, fields, object_types)
    return VaultModel(app, raw.get("label", app), VAULT_IDS[app], raw.get("picklists") or {}, objects,
                      raw.get("security_profiles") or {})
