"""Lineage: each task reports the datasets it read and wrote to Airflow's hook lineage collector,
which the OpenLineage provider (apache-airflow-providers-openlineage) turns into the inputs and
outputs of the task's OpenLineage events.

- Vault objects: `vault://<connection>/<object>` (the URIs of the load's Assets, airflow/assets.py);
  in OpenLineage namespace `vault://<connection>`, name `<object>` (`to_openlineage`, registered
  for the `vault` scheme in provider.py's `asset-uris`).
- Staged files and the run's quarantine files: their `file://` URLs (the common-io provider's
  converter).

Where OpenLineage is not installed or not configured (no transport), the collector is a no-op.
"""
from __future__ import annotations

import urllib.parse
from collections.abc import Iterable
from typing import Any, cast

SCHEME = "vault"


class _Task:
    """The lineage context the collector keys reports by (one per report)."""


def report(inputs: Iterable[str], outputs: Iterable[str]) -> None:
    """Datasets (URIs) the running task read and wrote."""
    from airflow.sdk.lineage import get_hook_lineage_collector

    # any object keys the collector's reports (its annotation names hooks and storage paths only)
    collector, context = get_hook_lineage_collector(), cast(Any, _Task())
    for uri in inputs:
        collector.add_input_asset(context, uri=_url(uri))
    for uri in outputs:
        collector.add_output_asset(context, uri=_url(uri))


def _url(uri: str) -> str:
    """A staged path without a scheme is a local file."""
    return uri if "://" in uri else f"file://{uri}"


def staged_urls(*staged: dict | None) -> list[str]:
    """The file URLs of Staged hand-offs (their XCom dicts: {name: {"path", "rows"}})."""
    return [f["path"] for s in staged if s for f in s.values()]


def quarantine_urls(run: dict) -> list[str]:
    """The run's quarantine files (written by validate, engine/quarantine_report.py)."""
    from clinical_crm.engine import storage
    from clinical_crm.engine.quarantine_report import run_file

    if not run.get("active"):
        return []
    return [storage.name(run_file(run["connection"], run["direction"], run["dag_run_id"], suffix))
            for suffix in (".quarantine.csv", ".quarantine.json")]


def sanitize_uri(uri: urllib.parse.SplitResult) -> urllib.parse.SplitResult:
    """`vault://<connection>/<object>`: Airflow's check of an Asset URI of the vault scheme."""
    if not uri.netloc or not uri.path.strip("/"):
        raise ValueError("a vault:// URI is vault://<connection>/<object>")
    return uri


def to_openlineage(asset, lineage_context):
    """An Asset of the vault scheme as an OpenLineage dataset."""
    from airflow.providers.common.compat.openlineage.facet import Dataset

    parsed = urllib.parse.urlsplit(asset.uri)
    return Dataset(namespace=f"{SCHEME}://{parsed.netloc}", name=parsed.path.strip("/"))
