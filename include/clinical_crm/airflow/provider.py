"""Airflow provider entry point: registers the `veeva_vault` connection type, and the `vault`
Asset URI scheme with its OpenLineage converter (airflow/lineage.py).

pyproject.toml declares `apache_airflow_provider = clinical_crm.airflow.provider:get_provider_info`.
Airflow 3.2+ reads the connection form declaratively from `conn-fields` and
`ui-field-behaviour` here (it deprecated the hook methods `get_connection_form_widgets` /
`get_ui_field_behaviour`, which the hook no longer has), so the form is defined once, in this file.
"""
from __future__ import annotations

from importlib.metadata import version

PACKAGE = "clinical-crm-connection"  # pyproject.toml's project name: its version is the provider's

CONN_TYPE = "veeva_vault"
HOOK_CLASS = "clinical_crm.airflow.hooks.VaultHook"

# Extras of a veeva_vault connection: name -> (label, JSON type, default, description).
EXTRA_FIELDS: dict[str, tuple[str, str, object, str]] = {
    "api_version": ("API version", "string", "v25.2", "Vault REST API version, e.g. v25.2"),
    "client_id": ("Client ID", "string", "clinical-crm-connection",
                  "Sent as X-VaultAPI-ClientID so Vault admins can see who calls"),
    "connect_timeout": ("Connect timeout (s)", "number", 10, "Seconds to wait for a TCP connection"),
    "read_timeout": ("Read timeout (s)", "number", 120, "Seconds to wait for a response"),
    "burst_floor": ("Burst reserve", "integer", 50,
                    "Calls left unspent in each burst window: at that point calls wait for the next "
                    "window instead of being delayed by Vault (0: no pacing)"),
    "burst_window_seconds": ("Burst window (s)", "number", 300,
                             "Length of Vault's burst window (5 minutes), aligned to the clock"),
    "call_deadline": ("Call deadline (s)", "number", 600,
                      "One API call and all its retries end within this many seconds"),
    "keep_alive_seconds": ("Keep-alive after idle (s)", "number", 600,
                           ("A keep-alive is sent once the session has been idle this long; keep it below "
                            "the vault's session timeout (0: never)")),
    "login_spacing_seconds": ("Login spacing (s)", "number", 1,
                              ("Least time between two logins of this vault and user in one process "
                               "(Vault limits logins per user and minute)")),
    "maintenance_max_wait": ("Maintenance wait (s)", "number", 1800,
                             ("Longest wait for a maintenance window Vault announces (once per call); keep it "
                              "below the task's execution timeout")),
}

UI_FIELD_BEHAVIOUR = {
    "hidden-fields": ["schema", "port"],
    "relabeling": {"host": "Vault URL", "login": "Username"},
    "placeholders": {
        "host": "https://myvault.veevavault.com",
        "login": "integration.user@example.com",
    },
}


def conn_fields() -> dict:
    return {
        name: {
            "label": label,
            "description": description,
            "schema": {"type": [json_type, "null"], "default": default},
        }
        for name, (label, json_type, default, description) in EXTRA_FIELDS.items()
    }


def get_provider_info() -> dict:
    return {
        "package-name": PACKAGE,
        "name": "Clinical Operations to Medical CRM connection",
        "description": "Veeva Vault REST API hook and connection type for the CTMS <-> Medical CRM DAGs.",
        "versions": [version(PACKAGE)],
        "hooks": [{"integration-name": "Veeva Vault", "python-modules": ["clinical_crm.airflow.hooks"]}],
        # Assets vault://<connection>/<object> (airflow/assets.py) and their OpenLineage datasets
        "asset-uris": [{"schemes": ["vault"], "handler": "clinical_crm.airflow.lineage.sanitize_uri",
                        "to_openlineage_converter": "clinical_crm.airflow.lineage.to_openlineage"}],
        "connection-types": [
            {
                "connection-type": CONN_TYPE,
                "hook-class-name": HOOK_CLASS,
                "hook-name": "Veeva Vault",
                "conn-fields": conn_fields(),
                "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
            }
        ],
    }
