"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect.client.orchestration import get_client

from stablenew_core import JobHistoryStore, JobRecord, Settings
from stablenew_core.prefect_env import prefect_settings


def generations_for(webui: Any, job_id: str, route: str | None = None) -> list[dict[str, Any]]:
    """The simulator's generation records of one job (optionally of one route)."""
    return [
        g
        for g in webui.stats()["generations"]
        if str(g.get("force_task_id") or "").startswith(job_id)
        and (route is None or g.get("route") == route)
    ]


def wait_for(condition: Callable[[], Any], timeout: float = 120, poll: float = 0.2) -> Any:
    """Poll until ``condition()`` is truthy; return its value or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(poll)


def wait_status(
    settings: Settings, job_id: str, statuses: tuple[str, ...], timeout: float = 120
) -> JobRecord:
    """Wait until the job's record has one of ``statuses``."""
    history = JobHistoryStore(settings)

    def reached() -> JobRecord | None:
        record = history.find(job_id)
        return record if record is not None and record.status in statuses else None

    result: JobRecord = wait_for(reached, timeout)
    return result


def wait_terminal(settings: Settings, job_id: str, timeout: float = 120) -> JobRecord:
    """Wait until the job ended; return its record."""
    return wait_status(settings, job_id, ("completed", "failed", "cancelled", "crashed"), timeout)


def state_names(settings: Settings, flow_run_id: str) -> list[str]:
    """The names of a flow run's states, oldest first."""
    with prefect_settings(settings), get_client(sync_client=True) as client:
        states = client.read_flow_run_states(flow_run_id)
    return [s.name for s in sorted(states, key=lambda s: s.timestamp)]
