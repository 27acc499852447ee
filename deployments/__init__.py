"""Work pool and deployment definitions: what queue mode runs on, created idempotently."""

from .pipeline import (
    PRIORITY_QUEUES,
    DeploymentRef,
    ensure_deployment,
    ensure_pin_queue,
    ensure_work_pool,
    find_deployment,
    pin_queue_name,
)

__all__ = [
    "PRIORITY_QUEUES",
    "DeploymentRef",
    "ensure_deployment",
    "ensure_pin_queue",
    "ensure_work_pool",
    "find_deployment",
    "pin_queue_name",
]
