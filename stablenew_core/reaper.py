"""Zombie reaping: runs whose worker died with them are marked Crashed, and resumed once.

A worker claims a run by setting it Pending with the message written by :func:`claim_message`
(worker name, host, pid and a per-process token). If the worker and its job are killed together,
the run would stay Running forever and hold the pool's only slot. Every worker sweeps the pool
when it starts and then with each heartbeat: a run whose claimer is a dead process on this host,
or a worker on another host whose heartbeats stopped, is set Crashed with the reason (or
Cancelled, if cancelling it was already asked); under the ``resume_once`` crash policy it then
goes back in the queue (Scheduled, ahead of later jobs) once, and resumes at the stage it had
reached, as finished stages are cached.

Every forced write first re-reads the run and goes ahead only if its state is still the one the
decision was made on, so two workers sweeping at once cannot crash or resume a run twice.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Cancelled, Crashed, Scheduled

from ._proc import pid_alive
from .notify import notify_record
from .records import record_from_flow_run
from .settings import Settings

logger = logging.getLogger("stablenew_core.reaper")

_CLAIM = re.compile(
    r"^claimed by (?P<worker>.+) on (?P<host>[^\s:]+):(?P<pid>\d+) \[(?P<token>[0-9a-f]+)\]$"
)
RESUMED_STATE_NAME = "Resuming"
STALE_HEARTBEATS = 3
PROCESS_TOKEN = uuid.uuid4().hex[:12]  # tells this process from an earlier one with the same pid


@dataclass(frozen=True)
class Claim:
    """Who runs a flow run."""

    worker: str
    host: str
    pid: int
    token: str


def claim_message(worker_name: str) -> str:
    """The Pending state's message a worker writes when it claims a run."""
    return f"claimed by {worker_name} on {socket.gethostname()}:{os.getpid()} [{PROCESS_TOKEN}]"


def parse_claim(message: str | None) -> Claim | None:
    """The claim in a Pending state's message, if it is one of ours."""
    match = _CLAIM.match(message or "")
    if match is None:
        return None
    return Claim(match["worker"], match["host"], int(match["pid"]), match["token"])


class Reaper:
    """Finds and ends the pool's zombie runs."""

    def __init__(self, client: SyncPrefectClient, settings: Settings, worker_name: str) -> None:
        self.client = client
        self.settings = settings
        self.worker_name = worker_name
        self.host = socket.gethostname()
        self.executing: UUID | None = None  # the run this process is executing right now

    def _active_runs(self) -> list[FlowRun]:
        return list(
            self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(
                            any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
                        )
                    )
                ),
                work_pool_filter=WorkPoolFilter(
                    name=WorkPoolFilterName(any_=[self.settings.work_pool])
                ),
                limit=200,
            )
        )

    def _states(self, flow_run: FlowRun) -> list[Any]:
        return sorted(self.client.read_flow_run_states(flow_run.id), key=lambda s: s.timestamp)

    def _dead_reason(self, run: FlowRun, claim: Claim, workers: dict[str, Any]) -> str | None:
        if claim.host == self.host:
            if claim.token == PROCESS_TOKEN:
                if run.id == self.executing:
                    return None
                return (
                    f"worker {claim.worker!r} (this process) lost the job: it is no longer "
                    "executing it"
                )
            if claim.pid != os.getpid() and pid_alive(claim.pid):
                return None
            return (
                f"worker {claim.worker!r} (pid {claim.pid} on {claim.host}) is gone: "
                "the job was running when its process died"
            )
        worker = workers.get(claim.worker)
        stale_after = timedelta(seconds=STALE_HEARTBEATS * self.settings.worker_heartbeat_seconds)
        last = getattr(worker, "last_heartbeat_time", None)
        if last is not None and datetime.now(UTC) - last < stale_after:
            return None
        return (
            f"worker {claim.worker!r} on {claim.host} stopped sending heartbeats "
            "while the job was running"
        )

    def sweep(self) -> list[str]:
        """End (and maybe resume) every zombie run of the pool; return their ids."""
        reaped: list[str] = []
        runs = self._active_runs()
        if not runs:
            return reaped
        workers = {
            worker.name: worker
            for worker in self.client.read_workers_for_work_pool(self.settings.work_pool)
        }
        for run in runs:
            states = self._states(run)
            claim = next(
                (
                    c
                    for s in reversed(states)
                    if s.type == StateType.PENDING and (c := parse_claim(s.message))
                ),
                None,
            )
            if claim is None:
                continue
            reason = self._dead_reason(run, claim, workers)
            if reason is not None and self.crash(run, reason, states=states):
                reaped.append(str(run.id))
        return reaped

    def _unchanged(self, run: FlowRun) -> bool:
        """True if the run is still in the state the caller decided on."""
        current = self.client.read_flow_run(run.id)
        return (
            current.state is not None
            and run.state is not None
            and (current.state.id == run.state.id)
        )

    def crash(self, run: FlowRun, reason: str, *, states: list[Any] | None = None) -> bool:
        """Mark ``run`` Crashed (Cancelled if a cancel was pending) and apply the crash policy.

        Returns False, doing nothing, if the run's state moved on since it was read.
        """
        if not self._unchanged(run):
            return False
        states = states if states is not None else self._states(run)
        if run.state is not None and run.state.type == StateType.CANCELLING:
            logger.warning("flow run %s: worker gone while cancelling; cancelled", run.id)
            self.client.set_flow_run_state(
                run.id, Cancelled(message=f"cancelled; {reason}"), force=True
            )
            self._notify(run)
            return True
        earlier_crashes = sum(1 for s in states if s.type == StateType.CRASHED)
        logger.warning("flow run %s crashed: %s", run.id, reason)
        self.client.set_flow_run_state(run.id, Crashed(message=reason), force=True)
        if self.settings.crash_policy != "resume_once" or earlier_crashes > 0:
            self._notify(run)
            return True
        crashed = self.client.read_flow_run(run.id)
        if crashed.state_type != StateType.CRASHED:
            return True  # someone else acted on it meanwhile
        self.client.set_flow_run_state(
            run.id,
            Scheduled(
                name=RESUMED_STATE_NAME,
                message=f"resumed once after a crash: {reason}",
                scheduled_time=run.expected_start_time or datetime.now(UTC),
            ),
            force=True,
        )
        return True

    def _notify(self, run: FlowRun) -> None:
        record = record_from_flow_run(self.client.read_flow_run(run.id), outputs=[])
        if record is not None:
            notify_record(self.settings, record)
