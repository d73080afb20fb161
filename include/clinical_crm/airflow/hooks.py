"""VaultHook: turns an Airflow connection of type `veeva_vault` into a VaultClient.

Connection: host = vault base URL (e.g. https://myvault.veevavault.com), login, password; extras
api_version, client_id, connect_timeout, read_timeout, burst_floor, burst_window_seconds,
call_deadline, keep_alive_seconds, login_spacing_seconds, maintenance_max_wait. Connections come
from Airflow only (UI, AIRFLOW_CONN_* variables, secrets backends).

Inside a task the client's calls carry `X-VaultAPI-ReferenceID` =
`{connection}:{dag id}:{run id}:{task id}:{try number}` (vault.reference), from the task's
context; outside a task (the UI's Test button, a script) none unless one is given.
The connection form (extra fields, labels, hidden fields) is declared in provider.py's
`conn-fields` / `ui-field-behaviour`, which Airflow 3.2+ reads without importing this module.

"""
from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from clinical_crm.airflow.provider import CONN_TYPE, EXTRA_FIELDS
from clinical_crm.vault import VaultClient, reference
from clinical_crm.vault.errors import VaultError

_CASTS = {"string": str, "number": float, "integer": int}


class VaultHook(BaseHook):
    conn_name_attr = "vault_conn_id"
    default_conn_name = "veeva_vault_default"
    conn_type = CONN_TYPE
    hook_name = "Veeva Vault"

    def __init__(self, vault_conn_id: str = default_conn_name, reference_id: str | None = None,
                 connection: str | None = None, **kwargs):
        """`reference_id`: sent on every call instead of the one built from the task context;
        `connection`: the connection file's name, the reference id's first part (default: the
        Airflow connection id)."""
        super().__init__(**kwargs)
        self.vault_conn_id = vault_conn_id
        self.reference_id = reference_id
        self.connection = connection
        self._client: VaultClient | None = None

    def client_arguments(self) -> dict[str, Any]:
        """VaultClient arguments from the Airflow connection (without logging the password)."""
        conn = self.get_connection(self.vault_conn_id)
        if not conn.host:
            raise ValueError(f"Airflow connection {self.vault_conn_id!r} has no host (the vault URL)")
        extras = conn.extra_dejson or {}
        arguments: dict[str, Any] = {
            "base_url": _base_url(conn.host, conn.port, conn.schema),
            "username": conn.login or "",
            "password": conn.password or "",
        }
        for name, (_label, json_type, _default, _description) in EXTRA_FIELDS.items():
            value = extras.get(name, extras.get(f"extra__{CONN_TYPE}__{name}"))
            if value not in (None, ""):
                arguments[name] = _CASTS[json_type](value)
        arguments["reference_id"] = self.reference_id or self.task_reference_id()
        return arguments

    def task_reference_id(self) -> str | None:
        """`{connection}:{dag id}:{run id}:{task id}:{try number}` of the running task, None when
        no task is running."""
        try:
            from airflow.sdk import get_current_context

            context = get_current_context()
        except (ImportError, RuntimeError):  # no task context: a script, the UI's Test button
            return None
        ti = context.get("ti")
        if ti is None or not context.get("run_id"):
            return None
        prefix = reference.run_prefix(self.connection or self.vault_conn_id, ti.dag_id, context["run_id"])
        return reference.task_reference(prefix, ti.task_id, ti.try_number)

    def get_client(self, **overrides) -> VaultClient:
        """A VaultClient for this connection, the one way to build one from Airflow (one per hook;
        the session is opened on first use). `overrides` replace client arguments, e.g.
        max_retries=1 to answer a person quickly; they give a client of its own."""
        if overrides:
            return VaultClient(**{**self.client_arguments(), **overrides})
        if self._client is None:
            self._client = VaultClient(**self.client_arguments())
        return self._client

    def get_conn(self) -> VaultClient:
        return self.get_client()

    def test_connection(self) -> tuple[bool, str]:
        """Authenticate once; Airflow's "Test" button shows the message."""
        try:
            client = self.get_client(max_retries=1)  # answer the UI quickly
            try:
                return True, f"Authenticated to vault {client.vault_id} as {client.username}"
            finally:
                client.close()
        except (VaultError, ValueError) as exc:
            return False, str(exc)


def _base_url(host: str, port: int | None, scheme: str | None) -> str:
    """host may be a full URL (https://x.veevavault.com) or a bare host name."""
    if "://" not in host:
        host = f"{scheme or 'https'}://{host}"
    host = host.rstrip("/")
    if port and host.count(":") < 2:
        host = f"{host}:{port}"
    return host
