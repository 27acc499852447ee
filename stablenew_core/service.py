"""JobService: the two ways a job is submitted, and what users do with the queue afterwards.

``submit_direct(job)`` runs the job now, in this process, through
:meth:`SingleNodeJobRunner.run_once`, and returns its final record: it never touches the queue.
``submit_queued(job)`` creates a deployment run on the single-slot work pool and returns at once;
a worker runs it. Both are recorded in Prefect, which is the history. The job id is the
idempotency key: submitting the same job twice makes one run.
"""

from __future__ import annotations

import logging
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client

from deployments import PRIORITY_QUEUES, DeploymentRef, ensure_deployment, find_deployment

from .errors import RunModeError
from .history import JobHistoryStore, build_record
from .jobs import Job, JobRecord
from .prefect_env import prefect_settings
from .runner import SingleNodeJobRunner
from .server import ensure_server
from .settings import Settings

logger = logging.getLogger("stablenew_core")


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
        if not self._server_checked and self._start_server:
            ensure_server(self.settings)
        self._server_checked = True

    def deploy(self) -> DeploymentRef:
        """Create or update the work pool, its queues and the deployment (idempotent)."""
        self._ensure_server()
        with prefect_settings(self.settings), get_client(sync_client=True) as client:
            self._deployment = ensure_deployment(
                client,
                work_pool=self.settings.work_pool,
                deployment_name=self.settings.deployment_name,
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
        """Route ``job`` by its run mode: direct -> :meth:`submit_direct`, queue -> queued."""
        if job.run_mode == "direct":
            return self.submit_direct(job)
        return self.submit_queued(job)

    def submit_direct(self, job: Job) -> JobRecord:
        """Run ``job`` now, synchronously, in this process; return its final record.

        A job whose id is already recorded is not run again: its record is returned.
        """
        if job.run_mode != "direct":
            raise RunModeError(
                f"submit_direct needs a job with run_mode='direct', got {job.run_mode!r} "
                f"(job {job.job_id}); use submit_queued or submit"
            )
        self._ensure_server()
        existing = self.history.find(job.job_id)
        if existing is not None:
            logger.info("job %s was already submitted; returning its record", job.job_id)
            return existing
        return self.runner.run_once(job)

    def submit_queued(self, job: Job, *, idempotency_key: str | None = None) -> JobRecord:
        """Create a deployment run for ``job`` on the pool; return at once (status queued).

        ``idempotency_key`` defaults to the job id: the same key returns the same run.
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
            flow_run = client.create_flow_run_from_deployment(
                deployment_id,
                parameters={"job": job.model_dump(mode="json")},
                tags=job.tags(),
                idempotency_key=idempotency_key or job.job_id,
                work_queue_name=queue_name,
            )
        return build_record(
            job,
            state=flow_run.state,
            flow_run_id=str(flow_run.id),
            outputs=[],
            started_at=flow_run.start_time,
            finished_at=flow_run.end_time,
        )

    def wait(self, job_id: str, *, timeout: float = 600.0, poll: float = 0.5) -> JobRecord:
        """Block until ``job_id`` reaches a terminal status; return its record."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            record = self.history.get(job_id)
            if record.is_terminal or time.monotonic() > deadline:
                return record
            time.sleep(poll)
