"""Zombie reaping: runs whose worker died with them are marked Crashed, and resumed once.

A worker claims a run by setting it Pending with the message written by :func:`claim_message`
(worker name, host, pid). If the worker and its job are killed together, the run would stay
Running forever and hold the pool's only slot. Every worker sweeps the pool when it starts and
then with each heartbeat: a run whose claimer is a dead process on this host, or a worker on
another host whose heartbeats stopped, is set Crashed with the reason; under the
``resume_once`` crash policy it then goes back in the queue (Scheduled) once, and resumes at the
stage it had reached, as finished stages are cached.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Crashed, Scheduled

from .notify import notify_terminal
from .records import record_from_flow_run
from .settings import Settings

logger = logging.getLogger("stablenew_core.reaper")

_CLAIM = re.compile(r"^claimed by (?P<worker>.+) on (?P<host>[^\s:]+):(?P<pid>\d+)$")
RESUMED_STATE_NAME = "Resuming"
STALE_HEARTBEATS = 3


@dataclass(frozen=True)
class Claim:
    """Who runs a flow run."""

    worker: str
    host: str
    pid: int


def claim_message(worker_name: str) -> str:
    """The Pending state's message a worker writes when it claims a run."""
    return f"claimed by {worker_name} on {socket.gethostname()}:{os.getpid()}"


def parse_claim(message: str | None) -> Claim | None:
    """The claim in a Pending state's message, if it is one of ours."""
    match = _CLAIM.match(message or "")
    if match is None:
        return None
    return Claim(match["worker"], match["host"], int(match["pid"]))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Reaper:
    """Finds and crashes the pool's zombie runs."""

    def __init__(self, client: SyncPrefectClient, settings: Settings, worker_name: str) -> None:
        self.client = client
        self.settings = settings
        self.worker_name = worker_name
        self.host = socket.gethostname()

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

    def _dead_reason(self, claim: Claim, workers: dict[str, Any]) -> str | None:
        if claim.host == self.host:
            if claim.pid == os.getpid() or _pid_alive(claim.pid):
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
        """Crash (and maybe resume) every zombie run of the pool; return their ids."""
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
            reason = self._dead_reason(claim, workers)
            if reason is None:
                continue
            self._crash(run, reason, states)
            reaped.append(str(run.id))
        return reaped

    def _crash(self, run: FlowRun, reason: str, states: list[Any]) -> None:
        earlier_crashes = sum(1 for s in states if s.type == StateType.CRASHED)
        logger.warning("flow run %s crashed: %s", run.id, reason)
        self.client.set_flow_run_state(run.id, Crashed(message=reason), force=True)
        if self.settings.crash_policy != "resume_once" or earlier_crashes > 0:
            self._notify_crashed(run, reason)
        else:
            self.client.set_flow_run_state(
                run.id,
                Scheduled(
                    name=RESUMED_STATE_NAME,
                    message=f"resumed once after a crash: {reason}",
                    scheduled_time=run.expected_start_time or datetime.now(UTC),
                ),
                force=True,
            )

    def _notify_crashed(self, run: FlowRun, reason: str) -> None:
        s = self.settings
        crashed = self.client.read_flow_run(run.id)
        record = record_from_flow_run(crashed, outputs=[])
        if record is not None:
            notify_terminal(
                s.webhook_url,
                record,
                attempts=s.webhook_attempts,
                backoff_seconds=s.webhook_backoff_seconds,
            )
