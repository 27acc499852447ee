"""SingleNodeJobRunner: executes jobs through the one pipeline flow, in this process.

``run_once(job)`` is direct mode: the flow called in-process, synchronously. ``run_forever()``
is the queue's worker: it asks Prefect for the pool's next deployment run (the server applies
the pool's concurrency limit and the queues' priorities), claims it (Pending), and runs the same
flow function in this long-lived process with the WebUI client warm, then asks again at once.
The worker heartbeats to Prefect (the UI shows it online), watches its run for cancellation,
and reaps zombies: runs whose worker died with them (see :mod:`stablenew_core.reaper`).
"""

from __future__ import annotations

import contextvars
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import UUID

import httpx
from prefect import tags
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import FlowRunCreate
from prefect.client.schemas.objects import FlowRun, FlowRunPolicy, State
from prefect.client.schemas.responses import OrchestrationResult, SetStateStatus
from prefect.context import SyncClientContext
from prefect.flow_engine import run_flow
from prefect.states import Cancelled, Pending, to_state_create

from deployments import PRIORITY_QUEUES, ensure_pin_queue
from flows.pipeline import pipeline
from stablenew_core import _prefect_internals

from .errors import JobStateError
from .jobs import Job, JobRecord
from .notify import notify_record
from .prefect_env import ensure_result_storage, prefect_settings
from .reaper import Reaper, claim_message
from .records import job_from_parameters, record_from_state
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
        self._job_thread: ThreadPoolExecutor | None = None
        self._reaper: Reaper
        self._clients = threading.local()
        self._flow_ids: dict[str, UUID] = {}
        self.jobs_run = 0
        _prefect_internals.install()

    @contextmanager
    def prefect_client(self) -> Iterator[SyncPrefectClient]:
        """This runner's Prefect settings and one open client per thread, reused by every run.

        Flow runs started inside the block use this client instead of opening their own (a
        new client costs ~20 ms, mostly building its TLS context), and so do Prefect calls of
        this library made inside it.
        """
        with prefect_settings(self.settings):
            client: SyncPrefectClient | None = getattr(self._clients, "client", None)
            if client is None:
                # A non-None httpx_settings makes get_client open a new client even inside
                # somebody else's client context; {} means Prefect's defaults.
                client = cast(SyncPrefectClient, get_client(sync_client=True, httpx_settings={}))
                client.__enter__()
                self._clients.client = client
            with SyncClientContext.model_construct(client=client):
                yield client

    def close(self) -> None:
        """Close the Prefect client this thread opened (others close when collected)."""
        client: SyncPrefectClient | None = getattr(self._clients, "client", None)
        if client is not None:
            self._clients.client = None
            client.__exit__(None, None, None)

    # -- direct -----------------------------------------------------------------------------

    def run_once(self, job: Job) -> JobRecord:
        """Run ``job`` now, in this process, through the pipeline flow; return its final record.

        The flow run is created with the job's idempotency key (else its id), so the check for
        a repeat is the creation itself: atomic across processes and one indexed lookup on the
        server however long the history. A job already recorded is not run again; the record
        of its run is returned.
        """
        ensure_result_storage(self.settings)
        installed = installed_control()
        control = RunControl(progress=installed.progress if installed else None)
        with (
            self.prefect_client() as client,
            use_runtime(self.runtime),
            use_control(control),
            tags(*job.tags()),
        ):
            flow_run, created = self._create_direct_run(client, job)
            if not created:
                logger.info("job %s was already submitted; returning its record", job.job_id)
                return self._recorded(flow_run)
            state = cast(
                State,
                run_flow(pipeline, flow_run=flow_run, parameters={"job": job}, return_type="state"),
            )
            _prefect_internals.release_job_services()
            if not state.is_final():
                state = _finish_cancelled(flow_run.id, state)
        record = record_from_state(job, state, flow_run.id)
        notify_record(self.settings, record)
        return record

    def _create_direct_run(self, client: SyncPrefectClient, job: Job) -> tuple[FlowRun, bool]:
        """The job's flow run, created Pending unless its key exists; and whether it is new."""
        for attempt in (1, 2):
            create = FlowRunCreate(
                flow_id=self._flow_id(client, refresh=attempt > 1),
                flow_version=pipeline.version,
                name=f"{job.source}-{job.job_id}",
                parameters=pipeline.serialize_parameters({"job": job}),
                tags=job.tags(),
                idempotency_key=job.idempotency_key or job.job_id,
                state=to_state_create(Pending()),
                empirical_policy=FlowRunPolicy(
                    retries=pipeline.retries, retry_delay=int(pipeline.retry_delay_seconds or 0)
                ),
            )
            try:
                response = client.request(
                    "POST", "/flow_runs/", json=create.model_dump(mode="json", exclude_unset=True)
                )
            except httpx.HTTPStatusError as exc:
                # The flow's id is cached per process: a flow deleted since fails the insert.
                if attempt == 1 and exc.response.status_code in (404, 409, 422):
                    continue
                raise
            flow_run = FlowRun.model_validate(response.json())
            return flow_run, response.status_code == 201
        raise AssertionError("unreachable")

    def _flow_id(self, client: SyncPrefectClient, *, refresh: bool = False) -> UUID:
        key = str(client.api_url)
        if refresh or key not in self._flow_ids:
            self._flow_ids[key] = client.create_flow_from_name(pipeline.name)
        return self._flow_ids[key]

    def _recorded(self, flow_run: FlowRun) -> JobRecord:
        """The record of an existing run, outputs included (read from its artifacts)."""
        from .history import JobHistoryStore

        existing = job_from_parameters(flow_run.parameters)
        with JobHistoryStore(self.settings) as history:
            record = history.find(existing.job_id) if existing else None
        if record is None:
            raise JobStateError(f"flow run {flow_run.id} exists for this key but is not a job")
        return record

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
        only_pinned: bool = False,
    ) -> int:
        """Serve the work pool one job at a time until stopped; return how many jobs ran.

        ``max_jobs`` and ``idle_timeout`` (seconds without work) end the loop early, for tests
        and batch use; ``only_pinned`` serves only the jobs pinned to this worker's name.
        """
        s = self.settings
        ran = 0
        ensure_result_storage(s)
        with self.prefect_client() as client, use_runtime(self.runtime):
            self._reaper = Reaper(client, s, self.worker_name)
            heartbeat = _Heartbeat(s, self.worker_name, self._reaper)
            heartbeat.start()
            try:
                idle_since = time.monotonic()
                while not self._stop.is_set():
                    try:
                        flow_run = self._next_run(client, only_pinned=only_pinned)
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
                    record = self._execute(flow_run)
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
                if self._job_thread is not None:
                    self._job_thread.shutdown(wait=True)
                    self._job_thread = None
        self.close()
        return ran

    def _next_run(self, client: SyncPrefectClient, *, only_pinned: bool = False) -> FlowRun | None:
        if self._queues is None:
            pin = ensure_pin_queue(client, self.settings.work_pool, self.worker_name)
            shared = [] if only_pinned else [name for name, _ in PRIORITY_QUEUES.values()]
            self._queues = [*shared, pin]
        responses = client.get_scheduled_flow_runs_for_work_pool(
            self.settings.work_pool,
            work_queue_names=self._queues,
            scheduled_before=datetime.now(UTC) + timedelta(seconds=1),
        )
        for response in responses:
            flow_run = response.flow_run
            self._reaper.executing = flow_run.id  # before the claim: never reap our own
            claim: OrchestrationResult[Any] = client.set_flow_run_state(
                flow_run.id, Pending(message=claim_message(self.worker_name)), force=False
            )
            if claim.status == SetStateStatus.ACCEPT:
                flow_run.state = claim.state
                return flow_run
            self._reaper.executing = None
        return None

    def _execute(self, flow_run: FlowRun) -> JobRecord | None:
        """Run one claimed flow run to its end; a failure of the engine itself crashes the run.

        The engine runs on a helper thread: Prefect then installs no SIGTERM handler, so a
        SIGTERM to the worker means "stop after this job", not "crash this job".
        """
        job = job_from_parameters(flow_run.parameters)
        outcome: dict[str, Any] = {}
        context = contextvars.copy_context()

        def target() -> None:
            try:
                with use_control(RunControl()), _prefect_internals.without_suspension_observer():
                    outcome["state"] = run_flow(pipeline, flow_run=flow_run, return_type="state")
            except BaseException as exc:
                outcome["error"] = exc

        # One long-lived job thread: Prefect keeps clients and event loops per thread, so a new
        # thread per job would leak a thread, a connection and ~2 MB with every job.
        if self._job_thread is None:
            self._job_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job")
        self._job_thread.submit(context.run, target).result()
        _prefect_internals.release_job_services()
        try:
            if "error" in outcome:
                exc = outcome["error"]
                logger.error("flow run %s: the engine failed: %r", flow_run.id, exc)
                current = self._reaper.client.read_flow_run(flow_run.id)
                if current.state is not None and not current.state.is_final():
                    self._reaper.executing = None
                    self._reaper.crash(current, f"the worker's engine failed: {exc!r}")
                return None
            state = cast(State, outcome["state"])
            if not state.is_final():
                state = _finish_cancelled(flow_run.id, state)
        finally:
            self._reaper.executing = None
        if job is None:
            return None
        record = record_from_state(job, state, flow_run.id)
        notify_record(self.settings, record)
        return record


def _finish_cancelled(flow_run_id: Any, state: State) -> State:
    """A run left Cancelling (cancelled before it started running) ends Cancelled."""
    with get_client(sync_client=True) as client:
        result: OrchestrationResult[Any] = client.set_flow_run_state(
            flow_run_id, Cancelled(message=state.message or "cancelled before it started")
        )
        return cast(State, result.state) if result.state is not None else state


class _Heartbeat:
    """Worker heartbeats to Prefect, and a zombie sweep, on a background thread."""

    def __init__(self, settings: Settings, worker_name: str, reaper: Reaper) -> None:
        self.settings = settings
        self.worker_name = worker_name
        self.reaper = reaper
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="worker-heartbeat")

    def start(self) -> None:
        self._beat_and_sweep()
        self._thread.start()

    def _beat_and_sweep(self) -> None:
        try:
            self._beat()
            self.reaper.sweep()
        except Exception as exc:  # the server may be restarting: the next beat tries again
            logger.warning("worker heartbeat failed: %r", exc)

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
                self._beat_and_sweep()
