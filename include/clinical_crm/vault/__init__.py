"""Everything Vault-specific: the REST client, VQL, typed responses, standard fields, errors.

No pandas and no Airflow here: the client speaks HTTP and hands back plain records, so any
Vault (CTMS, Medical CRM, or the sandbox) is reached the same way. The client (and with it
`requests`) is imported on first use, so flows can name queries at DAG parse time cheaply.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from clinical_crm.vault.responses import ApiLimits, QueryPage, RecordOutcome, VaultResponse, VaultWarning
from clinical_crm.vault.vql import Query

if TYPE_CHECKING:  # imported on first use (below); named here for type checkers and linters
    from clinical_crm.vault.client import VaultClient

__all__ = ["ApiLimits", "Query", "QueryPage", "RecordOutcome", "VaultClient", "VaultResponse", "VaultWarning"]


def __getattr__(name: str):
    if name == "VaultClient":
        return importlib.import_module("clinical_crm.vault.client").VaultClient
    if name in ("client", "errors", "fields", "vql", "responses", "reference", "session"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(name)
