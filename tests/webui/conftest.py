"""Fixtures of the WebUI tests: simulator processes on free 127.0.0.1 ports, and clients.

Each simulator is a real child process started here and stopped here. Tests share one plain
simulator and one with basic auth; every test starts from cleared faults, a tiny step time
and empty statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from stablenew_core.webui.client import WebUIClient
from stablenew_core.webui.process import SimulatorProcess

SIM_USER = "sim-user"
SIM_PASSWORD = "s3cr3t-Pa55word-xyz"
FAST_STEP = 0.001


@pytest.fixture(scope="session")
def sim_process() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(step_seconds=FAST_STEP, seed=1234) as sim:
        yield sim


@pytest.fixture
def sim(sim_process: SimulatorProcess) -> Iterator[SimulatorProcess]:
    """The shared simulator, reset for this test."""
    sim_process.clear_faults()
    sim_process.set_step_seconds(FAST_STEP)
    sim_process.reset()
    yield sim_process
    sim_process.clear_faults()
    sim_process.set_step_seconds(FAST_STEP)


@pytest.fixture
def client(sim: SimulatorProcess) -> Iterator[WebUIClient]:
    with WebUIClient(sim.url, read_timeout=60.0) as webui:
        yield webui


@pytest.fixture(scope="session")
def sim_credentials() -> tuple[str, str]:
    """The (user, password) of :func:`auth_sim`."""
    return SIM_USER, SIM_PASSWORD


@pytest.fixture(scope="session")
def auth_sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(step_seconds=FAST_STEP, auth=(SIM_USER, SIM_PASSWORD)) as sim:
        yield sim


def _wait_for(predicate: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Poll until ``predicate()`` holds (a readiness wait, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def wait_for() -> Callable[..., None]:
    return _wait_for
