"""Shared fixtures: one real Prefect server and one WebUI simulator per test session.

Both are real processes on 127.0.0.1, started by these fixtures and stopped by them. Each test
gets its own work pool and deployment, so queued runs of one test never reach another's worker.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Before anything imports Prefect: telemetry off, no ephemeral server, Prefect's home in a
# throwaway place, and the API of the session's server as the process-wide default (Prefect's
# background threads read that one).
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="stablenew-tests-"))
_SERVER_PORT = free_port()
for _key in list(os.environ):
    if _key.startswith(("STABLENEW_", "PREFECT_")):
        del os.environ[_key]
os.environ.update(
    {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
        "PREFECT_HOME": str(_SESSION_DIR / "prefect-client"),
        "PREFECT_API_URL": f"http://127.0.0.1:{_SERVER_PORT}/api",
    }
)

import pytest  # noqa: E402
from support import WorkerProcess  # noqa: E402

from stablenew_core.server import LocalServer  # noqa: E402
from stablenew_core.settings import Settings  # noqa: E402
from stablenew_core.webui.process import SimulatorProcess  # noqa: E402


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def prefect_server(session_dir: Path) -> Iterator[Settings]:
    """A real Prefect server (SQLite) for the whole session; yields its base settings."""
    settings = Settings(
        home=session_dir / "home",
        server_port=_SERVER_PORT,
        server_start_timeout=180,
    )
    server = LocalServer(settings)
    server.start(detach=False)
    try:
        yield settings
    finally:
        try:
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)  # ship buffered run logs while it answers
        finally:
            server.stop()


@pytest.fixture(scope="session")
def webui() -> Iterator[SimulatorProcess]:
    """The A1111 simulator as a real HTTP server process."""
    with SimulatorProcess(step_seconds=0.001) as sim:
        yield sim


@pytest.fixture
def slow_webui(webui: SimulatorProcess) -> Iterator[SimulatorProcess]:
    """The session's simulator at 20 ms per step for one test (jobs long enough to catch)."""
    webui.set_step_seconds(0.02)
    try:
        yield webui
    finally:
        webui.set_step_seconds(0.001)


@pytest.fixture
def settings(prefect_server: Settings, webui: SimulatorProcess, tmp_path: Path) -> Settings:
    """Settings for one test: the session's server and simulator, its own pool and outputs."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    return prefect_server.model_copy(
        update={
            "webui_url": webui.url,
            "output_dir": tmp_path / "outputs",
            "work_pool": name,
            "deployment_name": name,
            "worker_poll_seconds": 0.05,
            "worker_heartbeat_seconds": 5.0,
            "retry_backoff_seconds": 0.1,
        }
    )


@pytest.fixture
def start_worker(settings: Settings) -> Iterator[object]:
    """Start worker processes for this test; all are stopped when it ends."""
    workers: list[WorkerProcess] = []

    def start(
        *extra: str, settings_override: Settings | None = None, plain_env: bool = False
    ) -> WorkerProcess:
        worker = WorkerProcess(settings_override or settings, *extra, plain_env=plain_env)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
