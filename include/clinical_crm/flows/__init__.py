"""The flows of the connection, one module each (ctms_to_crm, crm_to_ctms): every module of
this package that defines `FLOW` is a flow; a new direction is one new module, found here."""
from __future__ import annotations

import importlib
import pkgutil

from clinical_crm.flows.base import Flow


def all_flows() -> list[Flow]:
    """Every flow, in module name order."""
    flows = []
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        flow = getattr(importlib.import_module(f"{__name__}.{module}"), "FLOW", None)
        if isinstance(flow, Flow):
            flows.append(flow)
    return flows


def flow(name: str) -> Flow:
    for candidate in all_flows():
        if candidate.name == name:
            return candidate
    raise KeyError(f"no flow named {name!r}")
