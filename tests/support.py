"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client

from stablenew_core import JobHistoryStore, JobRecord, Settings
from stablenew_core.prefect_env import prefect_settings, process_env
from stablenew_core.server import LocalServer
from stablenew_core.settings import settings_env
from stablenew_core.webui.process import free_port


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


# Under the resume_once crash policy a crashed run is Crashed for a moment before it goes back
# in the queue: tests that expect a resume wait for these instead of any terminal status.
SETTLED = ("completed", "failed", "cancelled")


def state_names(settings: Settings, flow_run_id: str) -> list[str]:
    """The names of a flow run's states, oldest first."""
    with prefect_settings(settings), get_client(sync_client=True) as client:
        states = client.read_flow_run_states(flow_run_id)
    return [s.name for s in sorted(states, key=lambda s: s.timestamp)]


def start_isolated_server(directory: Path, database_url: str | None = None) -> LocalServer:
    """A Prefect server of a test's own (its own data directory and port)."""
    from pydantic import SecretStr

    port = free_port()
    settings = Settings(
        home=directory,
        server_port=port,
        server_start_timeout=180,
        prefect_api_url=f"http://127.0.0.1:{port}/api",
        database_url=SecretStr(database_url) if database_url else None,
    )
    server = LocalServer(settings)
    server.start(detach=False)
    return server


class WorkerProcess:
    """``stablenew worker`` as a real child process."""

    def __init__(self, settings: Settings, *extra: str, plain_env: bool = False) -> None:
        """``plain_env``: only ``STABLENEW_*`` variables, as a user would start it (no
        ``PREFECT_*`` set up for it)."""
        if plain_env:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        else:
            env = process_env(settings)
        env.update(settings_env(settings))
        self.log = settings.home / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stablenew_core.cli", "worker", *extra],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """kill -9: the worker and its job die together."""
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def assert_one_at_a_time(generations: list[dict[str, Any]]) -> None:
    """No two generations of one WebUI overlap in time (as the WebUI saw them)."""
    spans = sorted((g["started_at"], g["finished_at"]) for g in generations if g.get("finished_at"))
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 1e-6, "one WebUI ran two generations at once"
