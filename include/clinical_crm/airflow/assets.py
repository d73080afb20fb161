"""The Airflow Assets a load writes: one per target object, `vault://<connection>/<object>`.

The load task declares them as its outlets (`target_assets`) and, when it succeeds, sets each
asset event's extra to what the run wrote into that object (`event_extras`): the run, its window
and the object's counts (created, updated, unchanged, failed, deletions_applied, ...; empty when
the configuration is inactive). A DAG scheduled on such an asset runs after every load of it;
docs/pipeline.md (Airflow Assets) shows one.
"""
from __future__ import annotations

from airflow.sdk import Asset

from clinical_crm.flows.base import Flow


def asset_uri(connection: str, object_name: str) -> str:
    return f"vault://{connection}/{object_name}"


def _objects(flow: Flow, cfg) -> dict[str, str]:
    """{target object: source object} of every enabled target and deletion mark, in write order."""
    objects = {t.target_object: t.source_object for t in flow.targets}
    for mark in flow.deletions:
        objects.setdefault(mark.target_object, mark.source_object)
    return objects


def source_uris(flow: Flow, cfg) -> list[str]:
    """The source vault objects the flow's extraction reads (lineage inputs)."""
    return [asset_uri(cfg.name, obj) for obj in sorted({r.object for r in flow.reads if r.counted and r.object})]


def target_assets(flow: Flow, cfg) -> list[Asset]:
    return [Asset(asset_uri(cfg.name, obj)) for obj in _objects(flow, cfg)]


def event_extras(flow: Flow, cfg, ctx, counts: dict[str, dict]) -> dict[str, dict]:
    """{asset uri: extra}: the run, its window and the counts of the object's source object
    (runner.load counts by source object)."""
    return {asset_uri(cfg.name, target): {"connection": cfg.name, "direction": flow.name,
                                          "dag_run_id": ctx.dag_run_id, "window_start": ctx.window_start,
                                          "window_end": ctx.window_end, "object": target,
                                          "source_object": source, "counts": counts.get(source, {})}
            for target, source in _objects(flow, cfg).items()}
