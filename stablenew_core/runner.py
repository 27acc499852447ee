"""SingleNodeJobRunner: executes jobs through the one pipeline flow, in this process.

``run_once(job)`` is direct mode: the flow called in-process, synchronously. ``run_forever()``
is the queue's worker: it asks Prefect for the pool's next deployment run (the server applies
the pool's concurrency limit and the queues' priorities), claims it (Pending), and runs the same
flow function in this long-lived process with the WebUI client warm, then asks again at once.
The worker heartbeats to Prefect (the UI shows it online), watches its run for cancellation,
and reaps zombies: runs whose worker died with them (see :mod:`stablenew_core.reaper`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from prefect import tags
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.client.schemas.responses import OrchestrationResult, SetStateStatus
from prefect.flow_engine import run_flow
from prefect.states import Pending

from deployments import PRIORITY_QUEUES, ensure_pin_queue
from flows.pipeline import pipeline
from stablenew_core import _prefect_internals

from .jobs import Job, JobRecord
from .prefect_env import prefect_settings
from .reaper import Reaper, claim_message
from .records import build_record, job_from_parameters, outputs_from_result
from .runtime import RunControl, Runtime, installed_control, use_control, use_runtime
from .settings import Settings

logger = logging.getLogger("stablenew_core.worker")

API_RETRY_SECONDS = 2.0


class SingleNodeJobRunner:
    """Runs jobs on this machine: one now (``run_once``) or the queue (``run_forever``)."""

    def __init__(self, settings: Settings | None = None, *, worker_name: str | None = None) -> None:
        self.settings = settings or Settings()
        self.runtime = Runtime(self.settings)
        self.worker_name = (
            worker_name or self.settings.worker_name or f"stablenew@{socket.gethostname()}"
        )
        self._stop = threading.Event()
        self._queues: list[str] | None = None
        self.jobs_run = 0
        _prefect_internals.install()

    # -- direct -----------------------------------------------------------------------------

    def run_once(self, job: Job) -> JobRecord:
        """Run ``job`` now, in this process, through the pipeline flow; return its final record."""
        control = installed_control() or RunControl()
        with (
            prefect_settings(self.settings),
            use_runtime(self.runtime),
            use_control(control),
            tags(*job.tags()),
        ):
            state = pipeline(job, return_state=True)
        flow_run_id = state.state_details.flow_run_id
        return build_record(
            job,
            state=state,
            flow_run_id=str(flow_run_id) if flow_run_id else None,
            outputs=outputs_from_result(state),
            finished_at=state.timestamp,
        )

    # -- queue ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run_forever`` to return after the job in progress."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def run_forever(
        self,
        *,
        max_jobs: int | None = None,
        idle_timeout: float | None = None,
        on_job: Callable[[JobRecord], None] | None = None,
    ) -> int:
        """Serve the work pool one job at a time until stopped; return how many jobs ran.

        ``max_jobs`` and ``idle_timeout`` (seconds without work) end the loop early, for tests
        and batch use.
        """
        s = self.settings
        ran = 0
        with prefect_settings(s), use_runtime(self.runtime), get_client(sync_client=True) as client:
            reaper = Reaper(client, s, self.worker_name)
            heartbeat = _Heartbeat(s, self.worker_name, reaper)
            heartbeat.start()
            try:
                idle_since = time.monotonic()
                while not self._stop.is_set():
                    try:
                        flow_run = self._next_run(client)
                    except Exception as exc:  # server restarting, network blip: wait, retry
                        logger.warning("cannot reach Prefect (%s); retrying", exc)
                        self._stop.wait(API_RETRY_SECONDS)
                        continue
                    if flow_run is None:
                        if (
                            idle_timeout is not None
                            and time.monotonic() - idle_since > idle_timeout
                        ):
                            break
                        self._stop.wait(s.worker_poll_seconds)
                        continue
                    record = self._execute(client, flow_run)
                    if record is not None:
                        ran += 1
                        self.jobs_run += 1
                        if on_job is not None:
                            on_job(record)
                    idle_since = time.monotonic()
                    if max_jobs is not None and ran >= max_jobs:
                        break
            finally:
                heartbeat.stop()
        return ran

    def _next_run(self, client: SyncPrefectClient) -> FlowRun | None:
        if self._queues is None:
            self._queues = [name for name, _ in PRIORITY_QUEUES.values()]
            self._queues.append(ensure_pin_queue(client, self.settings.work_pool, self.worker_name))
        responses = client.get_scheduled_flow_runs_for_work_pool(
            self.settings.work_pool,
            work_queue_names=self._queues,
            scheduled_before=datetime.now(UTC) + timedelta(seconds=1),
        )
        for response in responses:
            flow_run = response.flow_run
            claim: OrchestrationResult[Any] = client.set_flow_run_state(
                flow_run.id, Pending(message=claim_message(self.worker_name)), force=False
            )
            if claim.status == SetStateStatus.ACCEPT:
                flow_run.state = claim.state
                return flow_run
        return None

    def _execute(self, client: SyncPrefectClient, flow_run: FlowRun) -> JobRecord | None:
        job = job_from_parameters(flow_run.parameters)
        with use_control(RunControl()):
            state = cast(State, run_flow(pipeline, flow_run=flow_run, return_type="state"))
        if job is None:
            return None
        return build_record(
            job,
            state=state,
            flow_run_id=str(flow_run.id),
            outputs=outputs_from_result(state),
            finished_at=state.timestamp,
        )


class _Heartbeat:
    """Worker heartbeats to Prefect, and a zombie sweep, on a background thread."""

    def __init__(self, settings: Settings, worker_name: str, reaper: Reaper) -> None:
        self.settings = settings
        self.worker_name = worker_name
        self.reaper = reaper
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="worker-heartbeat")

    def start(self) -> None:
        self._beat()
        self.reaper.sweep()
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        self.reaper.client.send_worker_heartbeat(
            self.settings.work_pool,
            self.worker_name,
            heartbeat_interval_seconds=self.settings.worker_heartbeat_seconds,
            worker_metadata=None,
        )

    def _loop(self) -> None:
        with prefect_settings(self.settings), get_client(sync_client=True) as client:
            self.reaper.client = client
            while not self._done.wait(self.settings.worker_heartbeat_seconds):
                try:
                    self._beat()
                    self.reaper.sweep()
                except Exception:
                    logger.warning("worker heartbeat failed", exc_info=True)


def worker_identity() -> str:
    """host:pid of this process, as written in claims."""
    return f"{socket.gethostname()}:{os.getpid()}"
