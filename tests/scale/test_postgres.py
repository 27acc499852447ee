"""Beyond one machine: Prefect on PostgreSQL, one worker per GPU, history across many pages.

Needs a PostgreSQL server (``STABLENEW_TEST_POSTGRES``, default the machine's one at
127.0.0.1:5432, user postgres). ``.ci/run`` starts it when it is installed but down; where none
answers these tests are skipped (under CI=true they fail instead).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    WorkerProcess,
    assert_one_at_a_time,
    generations_for,
    start_isolated_server,
    wait_terminal,
)

from stablenew_core import JobHistoryStore, JobService, PipelineConfig, PipelineController, Settings
from stablenew_core.webui.process import SimulatorProcess

pytestmark = pytest.mark.postgres

ADMIN_URL = os.environ.get(
    "STABLENEW_TEST_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
CONFIG = PipelineConfig(prompt="a lantern in fog", steps=5, width=64, height=64, seed=9)


async def _admin(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(ADMIN_URL.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A fresh database on the PostgreSQL server, dropped afterwards."""
    name = f"stablenew_test_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs PostgreSQL at {ADMIN_URL}: {exc}")
        pytest.skip(f"no PostgreSQL at {ADMIN_URL} ({type(exc).__name__}); skipping")
    base = ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def pg_settings(pg_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A Prefect server on PostgreSQL for this module."""
    server = start_isolated_server(tmp_path_factory.mktemp("pg-home"), pg_database)
    try:
        yield server.settings
    finally:
        server.stop()


@pytest.fixture
def pg(pg_settings: Settings, tmp_path: Path) -> Settings:
    name = f"pg-{uuid.uuid4().hex[:8]}"
    return pg_settings.model_copy(
        update={
            "output_dir": tmp_path / "outputs",
            "work_pool": name,
            "deployment_name": name,
            "worker_poll_seconds": 0.05,
        }
    )


def test_two_workers_two_webuis_drain_40_jobs(pg: Settings) -> None:
    with SimulatorProcess(step_seconds=0.005) as sim1, SimulatorProcess(step_seconds=0.005) as sim2:
        service = JobService(pg)
        service.deploy(gpus=2)
        controller = PipelineController(service)
        jobs = [
            controller.build_job(
                CONFIG, run_mode="queue", source="add_to_queue", prompt_source="manual"
            )
            for _ in range(40)
        ]
        controller.submit(jobs)
        workers = [
            WorkerProcess(pg.model_copy(update={"webui_url": sim.url}), "--name", name)
            for sim, name in ((sim1, "gpu-1"), (sim2, "gpu-2"))
        ]
        try:
            for job in jobs:
                assert wait_terminal(pg, job.job_id, timeout=300).status == "completed"
        finally:
            for worker in workers:
                worker.stop()
        per_job: Counter[str] = Counter()
        for sim in (sim1, sim2):
            stats = sim.stats()
            assert len(stats["generations"]) > 0, "both workers must work"
            assert_one_at_a_time(stats["generations"])
            for job in jobs:
                per_job[job.job_id] += len(generations_for(sim, job.job_id))
        assert all(per_job[job.job_id] == 1 for job in jobs), "a job was lost or doubled"


def test_job_pinned_to_a_named_worker_runs_there(pg: Settings) -> None:
    with SimulatorProcess(step_seconds=0.001) as sim1, SimulatorProcess(step_seconds=0.001) as sim2:
        service = JobService(pg)
        service.deploy(gpus=2)
        controller = PipelineController(service)
        pinned = [
            controller.build_job(
                CONFIG, run_mode="queue", source="add_to_queue", prompt_source="manual",
                worker="gpu-2",
            )
            for _ in range(4)
        ]  # fmt: skip
        controller.submit(pinned)
        workers = [
            WorkerProcess(pg.model_copy(update={"webui_url": sim.url}), "--name", name)
            for sim, name in ((sim1, "gpu-1"), (sim2, "gpu-2"))
        ]
        try:
            for job in pinned:
                assert wait_terminal(pg, job.job_id).status == "completed"
        finally:
            for worker in workers:
                worker.stop()
        for job in pinned:
            assert len(generations_for(sim2, job.job_id)) == 1
            assert generations_for(sim1, job.job_id) == []


def test_history_pages_through_more_than_200_jobs_in_order(pg: Settings) -> None:
    controller = PipelineController(settings=pg)
    pack_id = f"many-{uuid.uuid4().hex[:6]}"
    jobs = [
        controller.build_job(
            CONFIG, run_mode="queue", source="add_to_queue", prompt_source="pack",
            prompt_pack_id=pack_id,
        )
        for _ in range(230)
    ]  # fmt: skip
    controller.submit(jobs)
    history = JobHistoryStore(pg)
    assert history.count(prompt_pack_id=pack_id) == 230
    everything = history.list(prompt_pack_id=pack_id, limit=1000)
    assert [r.job_id for r in everything] == [j.job_id for j in reversed(jobs)]
    pages: list[Any] = []
    for offset in range(0, 230, 50):
        pages += history.list(prompt_pack_id=pack_id, limit=50, offset=offset)
    assert [r.job_id for r in pages] == [r.job_id for r in everything]
    assert history.list(prompt_pack_id=pack_id, limit=10, offset=225)[-1].job_id == jobs[0].job_id
