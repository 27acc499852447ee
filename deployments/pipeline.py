"""The work pool ``stablenew`` (one GPU: concurrency limit 1) and the pipeline's deployment.

The pool has one work queue per priority (``high``, ``default`` for normal, ``low``); Prefect
hands out runs from higher-priority queues first, and by scheduled time within a queue. A job
pinned to a named worker goes to that worker's own queue (``pin-<name>``), which only that
worker polls. With several GPUs the pool's limit is the number of GPUs. The
deployment points at the installed package's flow by module path (no Docker, no git), so a
stock ``prefect worker start --pool stablenew`` can run it as well as ``stablenew worker``.
Every function here is idempotent: run it as often as you like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.types.entrypoint import EntrypointType

from flows.pipeline import FLOW_NAME, pipeline

# priority -> (work queue name, Prefect queue priority: 1 is served first)
PRIORITY_QUEUES: dict[str, tuple[str, int]] = {
    "high": ("high", 1),
    "normal": ("default", 2),
    "low": ("low", 3),
}


PIN_QUEUE_PRIORITY = 1


@dataclass(frozen=True)
class DeploymentRef:
    """Where queued jobs go."""

    deployment_id: UUID
    work_pool: str
    name: str


def pin_queue_name(worker_name: str) -> str:
    """The work queue of the jobs pinned to one named worker."""
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in worker_name.lower())
    return f"pin-{slug}"


def ensure_pin_queue(client: SyncPrefectClient, pool: str, worker_name: str) -> str:
    """Create the pin queue of ``worker_name`` if missing; return its name."""
    name = pin_queue_name(worker_name)
    try:
        client.read_work_queue_by_name(name, work_pool_name=pool)
    except ObjectNotFound:
        client.create_work_queue(name=name, work_pool_name=pool, priority=PIN_QUEUE_PRIORITY)
    return name


def ensure_work_pool(
    client: SyncPrefectClient, name: str, *, concurrency_limit: int | None = None
) -> None:
    """Create the pool and its priority queues, or bring them in line.

    A new pool gets ``concurrency_limit`` (default 1: one GPU). An existing pool keeps its limit
    unless one is given: with N GPUs, run ``stablenew deploy --gpus N`` once.
    """
    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        from prefect.workers.process import ProcessWorker

        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
                concurrency_limit=concurrency_limit or 1,
                description="stablenew: one job at a time per GPU",
            )
        )
    else:
        if concurrency_limit is not None and pool.concurrency_limit != concurrency_limit:
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))
    existing = {queue.name: queue for queue in client.read_work_queues(work_pool_name=name)}
    for queue_name, priority in sorted(PRIORITY_QUEUES.values(), key=lambda q: q[1]):
        queue = existing.get(queue_name)
        if queue is None:
            client.create_work_queue(name=queue_name, work_pool_name=name, priority=priority)
        elif queue.priority != priority:
            client.update_work_queue(queue.id, priority=priority)


def find_deployment(client: SyncPrefectClient, deployment_name: str) -> UUID | None:
    """The id of the pipeline deployment, if it exists."""
    try:
        return client.read_deployment_by_name(f"{FLOW_NAME}/{deployment_name}").id
    except ObjectNotFound:
        return None


def ensure_deployment(
    client: SyncPrefectClient,
    *,
    work_pool: str,
    deployment_name: str,
    concurrency_limit: int | None = None,
) -> DeploymentRef:
    """Create or update the pool, its queues and the pipeline deployment; return where to submit."""
    ensure_work_pool(client, work_pool, concurrency_limit=concurrency_limit)
    deployment: RunnerDeployment = pipeline.to_deployment(  # type: ignore[assignment]
        name=deployment_name,
        work_pool_name=work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["stablenew"],
        description="stablenew pipeline: queued jobs, one at a time on the GPU",
        job_variables={"command": "python -m prefect.engine"},
    )
    deployment_id = cast(UUID, deployment.apply())
    return DeploymentRef(deployment_id=deployment_id, work_pool=work_pool, name=deployment_name)
