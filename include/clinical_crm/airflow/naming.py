"""The names the DAG factory gives, in one place: the page links to the same DAG and task ids."""
from __future__ import annotations

from clinical_crm.flows.base import Flow

STEPS = ("begin", "extract", "validate", "transform", "load", "finish")  # every direction's tasks, in order


def dag_id(flow_name: str, connection: str) -> str:
    return f"{flow_name}__{connection}"


def reconcile_dag_id(connection: str) -> str:
    return f"reconcile__{connection}"


def housekeeping_dag_id(connection: str) -> str:
    return f"housekeeping__{connection}"


def reconcile_task_id(flow_name: str) -> str:
    return f"reconcile_{flow_name}"


def task_ids(flow: Flow | None) -> list[str]:
    """A direction DAG's task ids in run order: the pre-step's after begin, where the flow has one."""
    pre = [flow.pre_step.task_id] if flow is not None and flow.pre_step is not None else []
    return [STEPS[0], *pre, *STEPS[1:]]
