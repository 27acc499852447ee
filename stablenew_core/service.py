"""JobService: the two ways a job is submitted, and what users do with the queue afterwards.

``submit_direct(job)`` runs the job now, in this process, through
:meth:`SingleNodeJobRunner.run_once`, and returns its final record: it never touches the queue.
``submit_queued(job)`` creates a deployment run on the single-slot work pool and returns at once;
a worker runs it. Both are recorded in Prefect, which is the history. The job id is the
idempotency key: submitting the same job twice makes one run.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolUpdate
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.responses import OrchestrationResult, SetStateStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Cancelling, Scheduled
from pydantic import BaseModel, ValidationError

from deployments import (
    PRIORITY_QUEUES,
    DeploymentRef,
    ensure_deployment,
    ensure_pin_queue,
    find_deployment,
)

from .config import PipelineConfig
from .errors import ConfigError, JobNotFoundError, JobStateError, RunModeError
from .history import JobHistoryStore
from .jobs import TAG_ROOT, TERMINAL_STATUSES, Job, JobRecord, make_job, normalize_run_mode
from .notify import notify_record
from .outputs import job_output_dir
from .prefect_env import prefect_settings
from .records import build_record, job_from_parameters, record_from_flow_run, state_types_for
from .runner import SingleNodeJobRunner
from .server import ensure_server
from .settings import Settings

PAGE_LIMIT = 200
RETRYABLE_STATUSES = frozenset({"failed", "crashed", "cancelled"})


class WorkerInfo(BaseModel):
    """A worker of the pool, as Prefect last heard from it."""

    name: str
    status: str
    last_heartbeat: datetime | None = None


class QueueStatus(BaseModel):
    """The queue at a glance."""

    paused: bool
    running: list[JobRecord]
    queued: int
    workers: list[WorkerInfo]


def apply_edits(config: PipelineConfig, edits: dict[str, Any]) -> PipelineConfig:
    """``config`` with ``edits`` applied (sections merged key by key), validated again."""
    data = config.to_dict()
    for key, value in edits.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config edits {edits!r}: {exc}") from exc


class PruneReport(BaseModel):
    """What a prune removed (or would remove, for a dry run)."""

    cutoff: datetime
    dry_run: bool
    jobs: int = 0
    folders: int = 0


class JobService:
    """Submits jobs directly or to the queue; reads and controls them afterwards."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        runner: SingleNodeJobRunner | None = None,
        history: JobHistoryStore | None = None,
        start_server: bool = True,
    ) -> None:
        self.settings = settings or Settings()
        self._runner = runner
        self.history = history or JobHistoryStore(self.settings)
        self._start_server = start_server
        self._server_checked = False
        self._deployment: DeploymentRef | None = None

    # -- plumbing -----------------------------------------------------------------------

    @property
    def runner(self) -> SingleNodeJobRunner:
        """The runner used for direct jobs (created on first use)."""
        if self._runner is None:
            self._runner = SingleNodeJobRunner(self.settings)
        return self._runner

    def _ensure_server(self) -> None:
        if not self._server_checked:
            ensure_server(self.settings, start=self._start_server)
        self._server_checked = True

    def deploy(self, *, gpus: int | None = None) -> DeploymentRef:
        """Create or update the work pool, its queues and the deployment (idempotent).

        ``gpus`` sets the pool's concurrency limit (one job per GPU); by default a new pool
        gets 1 and an existing one keeps its limit.
        """
        self._ensure_server()
        with prefect_settings(self.settings), get_client(sync_client=True) as client:
            self._deployment = ensure_deployment(
                client,
                work_pool=self.settings.work_pool,
                deployment_name=self.settings.deployment_name,
                concurrency_limit=gpus,
            )
        return self._deployment

    def _deployment_id(self, client: SyncPrefectClient) -> UUID:
        if self._deployment is not None:
            return self._deployment.deployment_id
        deployment_id = find_deployment(client, self.settings.deployment_name)
        if deployment_id is None:
            self._deployment = ensure_deployment(
                client,
                work_pool=self.settings.work_pool,
                deployment_name=self.settings.deployment_name,
            )
            return self._deployment.deployment_id
        self._deployment = DeploymentRef(
            deployment_id, self.settings.work_pool, self.settings.deployment_name
        )
        return deployment_id

    # -- submission -----------------------------------------------------------------------

    def submit(self, job: Job) -> JobRecord:
        """Enforce ``job``'s run mode: direct -> :meth:`submit_direct`, queue -> queued.

        The one place that routes by run mode (:meth:`PipelineController.submit` calls it).
        """
        if normalize_run_mode(job.run_mode) == "direct":
            return self.submit_direct(job)
        return self.submit_queued(job)

    def submit_direct(self, job: Job) -> JobRecord:
        """Run ``job`` now, synchronously, in this process; return its final record.

        A job whose idempotency key (else id) is already recorded is not run again: the record
        of its run is returned (the creation of the flow run itself is the check).
        """
        if job.run_mode != "direct":
            raise RunModeError(
                f"submit_direct needs a job with run_mode='direct', got {job.run_mode!r} "
                f"(job {job.job_id}); use submit_queued or submit"
            )
        self._ensure_server()
        return self.runner.run_once(job)

    def submit_queued(self, job: Job) -> JobRecord:
        """Create a deployment run for ``job`` on the pool; return at once (status queued).

        The run's idempotency key is ``job.idempotency_key``, else the job id: submitting the
        same key again (even after restarts) returns the existing run instead of a new one.
        """
        if job.run_mode != "queue":
            raise RunModeError(
                f"submit_queued needs a job with run_mode='queue', got {job.run_mode!r} "
                f"(job {job.job_id}); use submit_direct or submit"
            )
        self._ensure_server()
        queue_name, _ = PRIORITY_QUEUES[job.priority]
        with prefect_settings(self.settings), get_client(sync_client=True) as client:
            deployment_id = self._deployment_id(client)
            if job.worker:
                queue_name = ensure_pin_queue(client, self.settings.work_pool, job.worker)
            flow_run = client.create_flow_run_from_deployment(
                deployment_id,
                parameters={"job": job.model_dump(mode="json")},
                tags=job.tags(),
                idempotency_key=job.idempotency_key or job.job_id,
                work_queue_name=queue_name,
            )
        # With a repeated key Prefect returns the existing run: report that run's job.
        return record_from_flow_run(flow_run, outputs=[]) or build_record(
            job, state=flow_run.state, flow_run_id=str(flow_run.id), outputs=[]
        )

    # -- queue control --------------------------------------------------------------------

    def pause(self) -> None:
        """Pause the queue: the running job finishes, nothing new starts (kept across restarts)."""
        self._set_paused(True)

    def resume(self) -> None:
        """Resume the queue."""
        self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        self._ensure_server()
        with prefect_settings(self.settings), get_client(sync_client=True) as client:
            self._deployment_id(client)  # the pool exists from here on
            client.update_work_pool(self.settings.work_pool, WorkPoolUpdate(is_paused=paused))

    def status(self) -> QueueStatus:
        """Paused or not, the running jobs, how many wait, and the pool's workers."""
        self._ensure_server()
        s = self.settings
        with prefect_settings(s), get_client(sync_client=True) as client:
            self._deployment_id(client)
            pool = client.read_work_pool(s.work_pool)
            pool_filter = WorkPoolFilter(name=WorkPoolFilterName(any_=[s.work_pool]))
            queued = client.count_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=state_types_for(["queued"]))
                    )
                ),
                work_pool_filter=pool_filter,
            )
            workers = [
                WorkerInfo(
                    name=w.name,
                    status=str(getattr(w.status, "value", w.status) or "unknown").lower(),
                    last_heartbeat=w.last_heartbeat_time,
                )
                for w in client.read_workers_for_work_pool(s.work_pool)
            ]
        running = self.history.list(status="running", limit=PAGE_LIMIT)
        in_pool = [r for r in running if r.run_mode == "queue"]
        return QueueStatus(
            paused=bool(pool.is_paused),
            running=in_pool,
            queued=int(queued),
            workers=workers,
        )

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: a queued one never starts; a running one is stopped at a safe point.

        Prefect's own state rules decide (nothing is forced), so a job that ended meanwhile is
        never overwritten: that is a :class:`JobStateError`.
        """
        self._ensure_server()
        record = self.history.get(job_id)
        if record.is_terminal or record.flow_run_id is None:
            raise JobStateError(f"job {job_id} already ended ({record.status}); nothing to cancel")
        with prefect_settings(self.settings), get_client(sync_client=True) as client:
            result: OrchestrationResult[Any] = client.set_flow_run_state(
                record.flow_run_id, Cancelling(message="cancellation requested")
            )
        if result.status == SetStateStatus.ABORT:
            ended = self.history.get(job_id)
            raise JobStateError(f"job {job_id} ended ({ended.status}) before it could be cancelled")
        updated = self.history.get(job_id)
        if updated.status == "cancelled":
            notify_record(self.settings, updated)
        return updated

    def move_to_front(self, job_id: str) -> JobRecord:
        """Move a queued job ahead of every other queued job of its priority."""
        self._ensure_server()
        record = self.history.get(job_id)
        if record.status != "queued" or record.flow_run_id is None:
            raise JobStateError(f"job {job_id} is {record.status}; only queued jobs can move")
        s = self.settings
        with prefect_settings(s), get_client(sync_client=True) as client:
            waiting = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                    )
                ),
                work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[s.work_pool])),
                sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC,
                limit=1,
            )
            earliest = (
                waiting[0].next_scheduled_start_time
                if waiting and waiting[0].next_scheduled_start_time
                else datetime.now(UTC)
            )
            front = min(earliest, datetime.now(UTC)) - timedelta(seconds=1)
            run = client.read_flow_run(UUID(record.flow_run_id))
            if run.state_type != StateType.SCHEDULED:
                raise JobStateError(f"job {job_id} started meanwhile; it cannot move")
            # Not forced: if a worker claims it this instant, Prefect rejects the move.
            result: OrchestrationResult[Any] = client.set_flow_run_state(
                record.flow_run_id, Scheduled(scheduled_time=front, message="moved to the front")
            )
            if result.status != SetStateStatus.ACCEPT:
                raise JobStateError(f"job {job_id} started meanwhile; it cannot move")
        return self.history.get(job_id)

    def retry(
        self,
        job_id: str,
        *,
        edits: dict[str, Any] | None = None,
        run_mode: str | None = None,
    ) -> JobRecord:
        """Submit a failed, crashed or cancelled job again, as a new job naming the old one.

        ``edits`` are PipelineConfig fields to change (e.g. ``{"width": 512}`` after an
        out-of-memory); nested sections merge key by key. The new job keeps the old one's
        provenance and run mode unless ``run_mode`` is given.
        """
        self._ensure_server()
        original = self._original_job(job_id)
        record = self.history.get(job_id)
        if record.status not in RETRYABLE_STATUSES:
            raise JobStateError(
                f"job {job_id} is {record.status}; only failed, crashed or cancelled jobs "
                "can be retried"
            )
        config = apply_edits(original.config, edits or {})
        job = make_job(
            config,
            run_mode=run_mode or original.run_mode,
            source=original.source,
            prompt_source=original.prompt_source,
            prompt_pack_id=original.prompt_pack_id,
            priority=original.priority,
            retried_from=original.job_id,
        )
        return self.submit(job)

    def _original_job(self, job_id: str) -> Job:
        with prefect_settings(self.settings), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[TAG_ROOT, f"job:{job_id}"])
                ),
                limit=1,
            )
        job = job_from_parameters(runs[0].parameters) if runs else None
        if job is None:
            raise JobNotFoundError(f"no job {job_id!r} in history")
        return job

    def prune(self, older_than: timedelta, *, dry_run: bool = False) -> PruneReport:
        """Delete ended jobs older than ``older_than``: their runs and their image folders.

        Only terminal jobs are pruned; queued and running ones are never touched.
        """
        self._ensure_server()
        cutoff = datetime.now(UTC) - older_than
        flow_filter = FlowRunFilter(
            tags=FlowRunFilterTags(all_=[TAG_ROOT]),
            state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=state_types_for(TERMINAL_STATUSES))
            ),
            expected_start_time=FlowRunFilterExpectedStartTime(before_=cutoff),
        )
        report = PruneReport(cutoff=cutoff, dry_run=dry_run)
        with prefect_settings(self.settings), get_client(sync_client=True) as client:
            while True:
                runs = client.read_flow_runs(
                    flow_run_filter=flow_filter,
                    sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                    limit=PAGE_LIMIT,
                    offset=report.jobs if dry_run else 0,
                )
                if not runs:
                    break
                for run in runs:
                    job = job_from_parameters(run.parameters)
                    if job is not None:
                        folder = job_output_dir(self.settings.outputs, job)
                        if folder.is_dir():
                            report.folders += 1
                            if not dry_run:
                                shutil.rmtree(folder, ignore_errors=True)
                    if not dry_run:
                        client.delete_flow_run(run.id)
                    report.jobs += 1
                if len(runs) < PAGE_LIMIT:
                    break
        return report

    def wait(self, job_id: str, *, timeout: float = 600.0, poll: float = 0.5) -> JobRecord:
        """Block until ``job_id`` reaches a terminal status; return its record."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            record = self.history.get(job_id)
            if record.is_terminal or time.monotonic() > deadline:
                return record
            time.sleep(poll)
