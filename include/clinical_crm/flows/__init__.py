"""The flows of the connection, one module each (ctms_to_crm, crm_to_ctms): every module of this
package that exports `build(cfg) -> Flow` is a flow. A new direction is one new module, found
here; modules outside the package (e.g. a test's) are added by naming them, comma-separated, in
$CLINICAL_CRM_FLOW_MODULES."""
from __future__ import annotations

import importlib
import os
import pkgutil
from types import ModuleType

from clinical_crm.config import ConnectionConfig
from clinical_crm.flows.base import VALID, Flow

FLOW_NAME_MAX = 20  # the ledger's direction columns (String(20)); DAG ids carry the name too


def flow_modules() -> list[ModuleType]:
    """Every flow module: this package's in name order, then those $CLINICAL_CRM_FLOW_MODULES names."""
    names = [f"{__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)]
    names += [n.strip() for n in os.environ.get("CLINICAL_CRM_FLOW_MODULES", "").split(",") if n.strip()]
    modules = [importlib.import_module(name) for name in names]
    return [m for m in modules if callable(getattr(m, "build", None))]


def build_all(cfg: ConnectionConfig) -> list[Flow]:
    """Every flow of one connection file, built from it."""
    flows = [checked(module.build(cfg)) for module in flow_modules()]
    names = [f.name for f in flows]
    if len(set(names)) != len(names):
        raise ValueError(f"two flow modules build a flow of the same name: {sorted(names)}")
    return flows


def build(name: str, cfg: ConnectionConfig) -> Flow:
    """The flow named `name`, built from one connection file."""
    for flow in build_all(cfg):
        if flow.name == name:
            return flow
    raise KeyError(f"no flow named {name!r}")


def checked(flow: Flow) -> Flow:
    """A flow whose name fits where it is stored, and whose parts refer to reads it declares."""
    if not flow.name.isidentifier() or len(flow.name) > FLOW_NAME_MAX:
        raise ValueError(f"flow name {flow.name!r}: at most {FLOW_NAME_MAX} characters, letters, digits and _ "
                         f"(the ledger stores it, DAG ids carry it)")
    staged = {r.name for r in flow.reads} | {k for r in flow.reads if (k := getattr(r, "known", None))}
    wanted = {t.source for t in flow.targets if t.source != VALID} | {d.staged for d in flow.deletions}
    if flow.validation is not None:
        wanted |= {flow.validation.read, *flow.validation.reference}
    if wanted - staged:
        raise ValueError(f"flow {flow.name}: parts use reads it does not declare: {sorted(wanted - staged)}")
    return flow
