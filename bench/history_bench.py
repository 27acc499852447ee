#!/usr/bin/env python
"""Issue 7's benchmark: history query latency and queue throughput with one and two workers.

    python bench/history_bench.py                                  # 1k and 10k jobs, both backends
    python bench/history_bench.py --sizes 1000,10000,100000 --backends sqlite
    python bench/history_bench.py --only throughput --jobs 40
    python bench/history_bench.py --markdown /tmp/history.md       # the tables as Markdown too

1. History: a Prefect server of its own per backend (SQLite: the server ``LocalServer`` starts;
   PostgreSQL: a throwaway database on 127.0.0.1:5432, user postgres, created and dropped here),
   a deployment from ``JobService.deploy()``, then flow runs created straight through Prefect's
   client (``create_flow_run_from_deployment`` with the job as parameter and its tags; one
   thread on SQLite, several on PostgreSQL). A share is forced Completed or Failed so status
   filters have something to filter. Sizes are cumulative: the database grows from one size to
   the next. At each size, after one warm-up call, each query runs ``--calls`` times:
   ``JobHistoryStore.list(limit=50)`` with one filter (run_mode, status) and ``count``.
2. Throughput (PostgreSQL): ``--jobs`` queued jobs of ~0.5 s simulated generation, the pool
   paused while they are submitted and the workers start, then resumed; drained by one
   ``stablenew worker`` process, then (a fresh pool with ``deploy(gpus=2)``) by two
   (``--name gpu-1`` / ``gpu-2``, each with its own simulator). Drain time runs from the resume
   to the last job's end time; every job must end completed with exactly one generation across
   the simulators (``/sim/stats``).

Everything runs on 127.0.0.1 in a temporary directory; servers, workers, simulators, the
temporary directory and the throwaway databases are removed at the end, errors or not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Before anything imports Prefect (as tests/conftest.py does): no inherited Prefect or
# stablenew settings, telemetry off, no ephemeral server, a throwaway PREFECT_HOME, and an API
# URL (the first server's) as the process-wide default.
WORKDIR = Path(tempfile.mkdtemp(prefix="stablenew-history-bench-"))
PORTS = {"sqlite": _free_port(), "postgresql": _free_port(), "throughput": _free_port()}
for _key in list(os.environ):
    if _key.startswith(("STABLENEW_", "PREFECT_")):
        del os.environ[_key]
os.environ.update(
    {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
        "PREFECT_HOME": str(WORKDIR / "prefect-client"),
        "PREFECT_API_URL": f"http://127.0.0.1:{PORTS['sqlite']}/api",
    }
)

from pydantic import SecretStr  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from stablenew_core import JobHistoryStore, JobService, PipelineConfig, Settings  # noqa: E402
from stablenew_core.history import filter_tags  # noqa: E402
from stablenew_core.jobs import Job, JobRecord, make_job, outputs_artifact_key  # noqa: E402
from stablenew_core.prefect_env import prefect_settings, process_env  # noqa: E402
from stablenew_core.server import LocalServer  # noqa: E402
from stablenew_core.settings import settings_env  # noqa: E402
from stablenew_core.webui.process import SimulatorProcess  # noqa: E402

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_BASE = "postgresql+asyncpg://postgres@127.0.0.1:5432"
TERMINAL = ("completed", "failed", "cancelled", "crashed")
SEED_CONFIG = PipelineConfig(prompt="a lantern in fog", steps=5, width=64, height=64, seed=9)
SEED_SNAPSHOT = make_job(
    SEED_CONFIG, run_mode="queue", source="run", prompt_source="manual"
).config_snapshot
# Queued jobs are Scheduled until the server marks them Late (bulk copies are copied Late).
STATE_NAMES = {"completed": {"Completed"}, "failed": {"Failed"}, "queued": {"Scheduled", "Late"}}
console = Console(width=160)  # wide enough for the tables when piped
err = Console(stderr=True, width=160)


def log(message: str) -> None:
    err.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}", highlight=False)


# -- processes and databases ---------------------------------------------------------------


async def _admin(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _vacuum_analyze(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


@contextmanager
def throwaway_database(label: str) -> Iterator[str]:
    """A fresh PostgreSQL database, dropped (WITH FORCE) afterwards; yields its asyncpg URL."""
    name = f"stablenew_bench_{label}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    log(f"created database {name}")
    try:
        yield f"{PG_BASE}/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        log(f"dropped database {name}")


@contextmanager
def prefect_server(label: str, port: int, database_url: str | None) -> Iterator[Settings]:
    """A Prefect server of its own (home under WORKDIR); yields settings pointing at it."""
    settings = Settings(
        home=WORKDIR / f"home-{label}",
        server_port=port,
        server_start_timeout=240,
        prefect_api_url=f"http://127.0.0.1:{port}/api",
        database_url=SecretStr(database_url) if database_url else None,
        work_pool=f"bench-{label}",
        deployment_name=f"bench-{label}",
    )
    server = LocalServer(settings)
    started = time.monotonic()
    try:
        server.start(detach=False)
        log(f"{label} server on port {port} healthy after {time.monotonic() - started:.1f} s")
        yield settings
    finally:
        server.stop()
        log(f"{label} server stopped")


class Worker:
    """``stablenew worker`` as a child process in its own session (stopped with its group)."""

    def __init__(self, settings: Settings, name: str) -> None:
        env = process_env(settings)
        env.update(settings_env(settings))
        self.log = settings.home / f"worker-{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stablenew_core.cli", "worker", "--name", name],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )

    def serving(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"worker exited: {self.log.read_text(errors='replace')[-2000:]}")
        return "serving pool" in self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=20)
        if self.process.poll() is None:
            with suppress(OSError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def wait_for(condition: Callable[[], Any], timeout: float, poll: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(poll)


# -- 1. history ------------------------------------------------------------------------------


def seed_attrs(i: int) -> dict[str, Any]:
    """Job number ``i``: 70% queue / 30% direct, a few sources, every 10th from a pack."""
    from_pack = i % 10 == 0
    return {
        "run_mode": "direct" if i % 10 in (3, 6, 9) else "queue",
        "source": ("add_to_queue", "run", "run_now")[i % 3],
        "prompt_source": "pack" if from_pack else "manual",
        "prompt_pack_id": f"pack-{i % 7}" if from_pack else None,
    }


def seed_job(i: int, created_at: datetime | None = None) -> Job:
    """Job number ``i`` (:func:`seed_attrs`), created now or at ``created_at``."""
    return make_job(SEED_CONFIG, created_at=created_at, **seed_attrs(i))


def seed_status(i: int) -> str:
    """What job ``i`` ends as: 30% completed, 10% failed, the rest queued (Scheduled, Late)."""
    if i % 10 in (0, 1, 2):
        return "completed"
    if i % 10 == 4:
        return "failed"
    return "queued"


def seed_outputs(job: Job) -> list[dict[str, Any]]:
    """The rows of a completed job's outputs table artifact, as the flow writes them."""
    day = job.created_at.strftime("%Y-%m-%d")
    path = f"/bench/outputs/{day}/{job.job_id}/txt2img_0.png"
    return [{"stage": "txt2img", "index": 0, "path": path, "seed": 9}]


@dataclass(slots=True)
class Seeded:
    """What the benchmark remembers of one recorded job, to check history against."""

    index: int
    job_id: str
    expected_start: datetime
    flow_run_id: str


def seed_api(
    settings: Settings, deployment_id: Any, start: int, stop: int, threads: int
) -> list[Seeded]:
    """Record jobs ``start..stop-1`` through Prefect's API, as ``submit_queued`` does (a
    deployment run with the job as parameter, its tags, the job id as idempotency key); then
    force the Completed (with the job's outputs artifact, as the flow creates it) and Failed
    ones. ~10 jobs/s on this machine."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.states import Completed, Failed

    errors: list[BaseException] = []
    seeded: list[Seeded] = []

    def work(indices: range) -> None:
        try:
            with prefect_settings(settings), get_client(sync_client=True) as client:
                for i in indices:
                    job = seed_job(i)
                    run = client.create_flow_run_from_deployment(
                        deployment_id,
                        parameters={"job": job.model_dump(mode="json")},
                        tags=job.tags(),
                        idempotency_key=job.job_id,
                    )
                    assert run.expected_start_time is not None
                    seeded.append(Seeded(i, job.job_id, run.expected_start_time, str(run.id)))
                    status = seed_status(i)
                    if status == "completed":
                        client.set_flow_run_state(run.id, Completed(), force=True)
                        client.create_artifact(
                            ArtifactCreate(
                                key=outputs_artifact_key(job.job_id),
                                type="table",
                                data=seed_outputs(job),
                                description=f"Images of job {job.job_id} (final: 1)",
                                flow_run_id=run.id,
                            )
                        )
                    elif status == "failed":
                        client.set_flow_run_state(run.id, Failed(message="bench"), force=True)
        except BaseException as exc:
            errors.append(exc)

    pool = [
        threading.Thread(target=work, args=(range(start + t, stop, threads),), daemon=True)
        for t in range(threads)
    ]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    return sorted(seeded, key=lambda s: s.index)


def _tables(db: Any) -> tuple[Any, Any, Any, Any]:
    """Prefect's flow_run, flow_run_state, artifact and artifact_collection tables."""
    return (
        db.FlowRun.__table__,
        db.FlowRunState.__table__,
        db.Artifact.__table__,
        db.ArtifactCollection.__table__,
    )


class BulkSeeder:
    """Bulk inserts into the server's own database through Prefect's server ORM layer.

    Prefect's API creates ~10 runs/s here, so 100k jobs would take hours. This writes the
    same rows directly: the first ``TEMPLATE_JOBS`` jobs are recorded through the API
    (:func:`seed_api`) and, once the Scheduled ones have been marked Late by the server, their
    rows (``flow_run``, every ``flow_run_state`` row, ``artifact`` and ``artifact_collection``)
    are read back through ``prefect.server.database`` and copied for each further job of the
    same kind, changing only what differs between two jobs: ids, name, the job parameter and
    tags, the idempotency key, the outputs artifact's key/data, and every timestamp (shifted
    together). Rows go in through the same SQLAlchemy tables and column types Prefect uses, in
    the order Prefect writes them (run, states, then the run's ``state_id``). Events are not
    written (history does not read them). :meth:`check_shape` compares a copy with its
    template field by field through the API.

    Bulk jobs are older than the template jobs: job ``i`` is expected to start at
    ``oldest + i * SPACING``, ``oldest`` chosen so that the last job of ``n_max`` still comes
    before the templates; within the bulk jobs, a larger index is newer.
    """

    TEMPLATE_JOBS = 10  # one of each kind: i % 10 decides run mode, source and status
    SPACING = timedelta(milliseconds=500)
    BATCH = 2000

    def __init__(self, settings: Settings, deployment_id: Any, n_max: int) -> None:
        self.settings = settings
        self.deployment_id = deployment_id
        self.n_max = n_max
        self.url = LocalServer(settings).env()["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
        self.templates: dict[int, dict[str, Any]] = {}  # i % 10 -> rows of that template job
        self.template_seeded: list[Seeded] = []
        self.oldest: datetime | None = None

    def _db(self) -> Any:
        from prefect.server.database.configurations import (
            AioSqliteConfiguration,
            AsyncPostgresConfiguration,
        )
        from prefect.server.database.interface import PrefectDBInterface
        from prefect.server.database.orm_models import (
            AioSqliteORMConfiguration,
            AsyncPostgresORMConfiguration,
        )
        from prefect.server.database.query_components import (
            AioSqliteQueryComponents,
            AsyncPostgresQueryComponents,
        )

        if self.url.startswith("sqlite"):
            return PrefectDBInterface(
                database_config=AioSqliteConfiguration(connection_url=self.url),
                query_components=AioSqliteQueryComponents(),
                orm=AioSqliteORMConfiguration(),
            )
        return PrefectDBInterface(
            database_config=AsyncPostgresConfiguration(connection_url=self.url),
            query_components=AsyncPostgresQueryComponents(),
            orm=AsyncPostgresORMConfiguration(),
        )

    def seed_templates(self) -> list[Seeded]:
        """Record the template jobs through the API; wait until the server marks the
        Scheduled ones Late (so copies are not re-marked one by one); read their rows."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        seeded = seed_api(self.settings, self.deployment_id, 0, self.TEMPLATE_JOBS, 1)
        ids = [uuid.UUID(s.flow_run_id) for s in seeded]
        queued = [s for s in seeded if seed_status(s.index) == "queued"]

        def all_late() -> bool:
            with prefect_settings(self.settings), get_client(sync_client=True) as client:
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        id=FlowRunFilterId(any_=[uuid.UUID(s.flow_run_id) for s in queued])
                    )
                )
            return len(runs) == len(queued) and all(r.state_name == "Late" for r in runs)

        log("template jobs recorded through the API; waiting for the server to mark them Late")
        wait_for(all_late, timeout=120, poll=1.0)
        rows = asyncio.run(self._read_templates(ids))
        for s in seeded:
            template = rows[uuid.UUID(s.flow_run_id)]
            template["job_created_at"] = Job.model_validate(
                template["run"]["parameters"]["job"]
            ).created_at
            self.templates[s.index % 10] = template
        self.template_seeded = seeded
        first = min(s.expected_start for s in seeded)
        self.oldest = first - self.SPACING * (self.n_max + 1)
        return seeded

    async def _read_templates(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
        import sqlalchemy as sa

        db = self._db()
        runs, states, artifacts, collections = _tables(db)
        out: dict[uuid.UUID, dict[str, Any]] = {}
        try:
            async with db.session_context() as session:
                for row in (
                    await session.execute(sa.select(runs).where(runs.c.id.in_(ids)))
                ).mappings():
                    out[row["id"]] = {
                        "run": dict(row),
                        "states": [],
                        "artifacts": [],
                        "collections": [],
                    }
                for table, key in (
                    (states, "states"),
                    (artifacts, "artifacts"),
                    (collections, "collections"),
                ):
                    query = sa.select(table).where(table.c.flow_run_id.in_(ids))
                    if table is states:
                        query = query.order_by(table.c.timestamp)
                    for row in (await session.execute(query)).mappings():
                        out[row["flow_run_id"]][key].append(dict(row))
        finally:
            await (await db.engine()).dispose()
        return out

    def seed(self, start: int, stop: int) -> list[Seeded]:
        """Record jobs ``start..stop-1`` (all >= TEMPLATE_JOBS) by copying template rows."""
        assert start >= self.TEMPLATE_JOBS and self.oldest is not None
        seeded: list[Seeded] = []
        for lo in range(start, stop, self.BATCH * 5):
            batch = [self._copy(i) for i in range(lo, min(stop, lo + self.BATCH * 5))]
            asyncio.run(self._insert(batch))
            seeded += [rows["seeded"] for rows in batch]
        if self.url.startswith("postgresql"):
            # What autovacuum does on a live server, which a bulk load gives it no time for:
            # without it PostgreSQL plans from empty statistics and scans dead row versions
            # (measured: list(status='failed') 85-150 ms at 100k before, 31-35 ms after).
            asyncio.run(_vacuum_analyze(self.url))
        return seeded

    def _copy(self, i: int) -> dict[str, Any]:
        from prefect._internal.uuid7 import uuid7
        from prefect.utilities.names import generate_slug

        assert self.oldest is not None
        template = self.templates[i % 10]
        t_run = template["run"]
        delta = self.oldest + self.SPACING * i - t_run["expected_start_time"]
        job = seed_job(i, created_at=template["job_created_at"] + delta)
        run_id = uuid.uuid4()

        def shifted(row: dict[str, Any], *names: str) -> dict[str, Any]:
            copy = dict(row)
            for name in names:
                if copy.get(name) is not None:
                    copy[name] = copy[name] + delta
            return copy

        run = shifted(
            t_run, "created", "updated", "expected_start_time", "next_scheduled_start_time",
            "start_time", "end_time", "state_timestamp",
        )  # fmt: skip
        run.update(
            id=run_id,
            name=generate_slug(2),
            parameters={"job": job.model_dump(mode="json")},
            tags=job.tags(),
            idempotency_key=job.job_id,
            state_id=None,  # set after the states exist, as Prefect does
        )
        states = []
        for t_state in template["states"]:
            state = shifted(t_state, "created", "updated", "timestamp")
            state["id"] = uuid7(ms=int(state["timestamp"].timestamp() * 1000))
            state["flow_run_id"] = run_id
            details = t_state["state_details"]
            state["state_details"] = details.model_copy(
                update={
                    "flow_run_id": run_id,
                    "scheduled_time": details.scheduled_time + delta
                    if details.scheduled_time is not None
                    else None,
                    "transition_id": uuid.uuid4() if details.transition_id else None,
                }
            )
            states.append(state)
        artifacts, collections = [], []
        for t_artifact, t_collection in zip(
            template["artifacts"], template["collections"], strict=True
        ):
            artifact = shifted(t_artifact, "created", "updated")
            artifact.update(
                id=uuid.uuid4(),
                key=outputs_artifact_key(job.job_id),
                data=seed_outputs(job),
                description=f"Images of job {job.job_id} (final: 1)",
                flow_run_id=run_id,
            )
            collection = shifted(t_collection, "created", "updated")
            collection.update(
                id=uuid.uuid4(),
                key=artifact["key"],
                latest_id=artifact["id"],
                data=artifact["data"],
                description=artifact["description"],
                flow_run_id=run_id,
            )
            artifacts.append(artifact)
            collections.append(collection)
        return {
            "run": run,
            "states": states,
            "artifacts": artifacts,
            "collections": collections,
            "seeded": Seeded(i, job.job_id, run["expected_start_time"], str(run_id)),
        }

    async def _insert(self, batch: list[dict[str, Any]]) -> None:
        import sqlalchemy as sa

        db = self._db()
        runs, states, artifacts, collections = _tables(db)
        try:
            for lo in range(0, len(batch), self.BATCH):
                part = batch[lo : lo + self.BATCH]
                async with db.session_context(begin_transaction=True) as session:
                    await session.execute(sa.insert(runs), [b["run"] for b in part])
                    await session.execute(sa.insert(states), [s for b in part for s in b["states"]])
                    artifact_rows = [a for b in part for a in b["artifacts"]]
                    if artifact_rows:
                        await session.execute(sa.insert(artifacts), artifact_rows)
                        await session.execute(
                            sa.insert(collections), [c for b in part for c in b["collections"]]
                        )
                    await session.execute(
                        sa.update(runs)
                        .where(runs.c.id == sa.bindparam("run_id"))
                        .values(
                            state_id=sa.bindparam("last_state_id"),
                            updated=sa.bindparam("run_updated"),  # the template's, shifted
                        ),
                        [
                            {
                                "run_id": b["run"]["id"],
                                "last_state_id": b["states"][-1]["id"],
                                "run_updated": b["run"]["updated"],
                            }
                            for b in part
                        ],
                    )
        finally:
            await (await db.engine()).dispose()


_RAW_CLIENTS: dict[str, Any] = {}


def _raw_client(kind: str, settings: Settings) -> Any:
    """One client per kind and server, kept open like JobHistoryStore keeps its own (opening
    a client costs ~17 ms here, mostly its TLS context)."""
    key = f"{kind} {settings.local_api_url}"
    if key not in _RAW_CLIENTS:
        if kind == "prefect":
            from prefect.client.orchestration import get_client

            with prefect_settings(settings):
                client = get_client(sync_client=True)
                client.__enter__()
        else:
            import httpx

            client = httpx.Client(base_url=settings.local_api_url, timeout=30)
        _RAW_CLIENTS[key] = client
    return _RAW_CLIENTS[key]


def raw_page(settings: Settings) -> list[Any]:
    """Prefect's own client call for list(run_mode='queue'): full FlowRun objects, no records."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    tags = FlowRunFilterTags(all_=filter_tags(run_mode="queue"))
    return list(
        _raw_client("prefect", settings).read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=tags),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=50,
        )
    )


def raw_http(settings: Settings) -> int:
    """The same request as :func:`raw_page` over a plain httpx client, body not parsed: the
    server's time plus transfer. Returns the body size in bytes."""
    body = {
        "flow_runs": {"tags": {"all_": filter_tags(run_mode="queue")}},
        "sort": "EXPECTED_START_TIME_DESC",
        "limit": 50,
    }
    response = _raw_client("httpx", settings).post("/flow_runs/filter", json=body)
    response.raise_for_status()
    return len(response.content)


# -- checking what was seeded ------------------------------------------------------------------


class SeedCheckError(RuntimeError):
    """History does not read back what the benchmark recorded."""


def _expected(seeded: list[Seeded], **filters: str) -> list[Seeded]:
    """The recorded jobs matching ``filters``, newest first (as history orders them)."""
    out = []
    for s in seeded:
        attrs = seed_attrs(s.index)
        if "run_mode" in filters and attrs["run_mode"] != filters["run_mode"]:
            continue
        if "status" in filters and seed_status(s.index) != filters["status"]:
            continue
        if "prompt_pack_id" in filters and attrs["prompt_pack_id"] != filters["prompt_pack_id"]:
            continue
        out.append(s)
    return sorted(out, key=lambda s: s.expected_start, reverse=True)


def check_record(record: JobRecord, s: Seeded) -> None:
    """``record`` is job ``s`` as recorded: every field the benchmark knows."""
    attrs = seed_attrs(s.index)
    status = seed_status(s.index)
    expected_outputs = (
        [f"/bench/outputs/{record.created_at:%Y-%m-%d}/{s.job_id}/txt2img_0.png"]
        if status == "completed" and record.created_at is not None
        else []
    )
    problems = [
        f"{name}: {got!r} != {want!r}"
        for name, got, want in (
            ("job_id", record.job_id, s.job_id),
            ("flow_run_id", record.flow_run_id, s.flow_run_id),
            ("run_mode", record.run_mode, attrs["run_mode"]),
            ("source", record.source, attrs["source"]),
            ("prompt_source", record.prompt_source, attrs["prompt_source"]),
            ("prompt_pack_id", record.prompt_pack_id, attrs["prompt_pack_id"]),
            ("status", record.status, status),
            ("state_name", record.state_name in STATE_NAMES[status], True),
            ("error", record.error, "bench" if status == "failed" else None),
            ("config_snapshot", record.config_snapshot, SEED_SNAPSHOT),
            ("outputs", record.outputs, expected_outputs),
            ("created_at set", record.created_at is not None, True),
        )
        if got != want
    ]
    if problems:
        raise SeedCheckError(f"job {s.index} ({s.job_id}) reads back wrong: {problems}")


def verify_history(history: JobHistoryStore, seeded: list[Seeded], size: int) -> None:
    """Fail loudly unless history reads back exactly what was recorded: counts per filter,
    newest-first pages with every record's fields, paging across Prefect's 200-run page, get."""
    if len(seeded) != size:
        raise SeedCheckError(f"seeded {len(seeded)} jobs, expected {size}")
    by_index = {s.index: s for s in seeded}
    count_checks: list[dict[str, str]] = [
        {},
        {"run_mode": "queue"},
        {"status": "failed"},
        {"status": "completed"},
        {"status": "queued"},
        {"prompt_pack_id": "pack-3"},
    ]
    for filters in count_checks:
        got = history.count(**filters)  # type: ignore[arg-type]
        want = len(_expected(seeded, **filters))
        if got != want:
            raise SeedCheckError(f"count({filters}) = {got}, expected {want} (of {size})")
    for filters in count_checks:
        want_ids = [s.job_id for s in _expected(seeded, **filters)[:50]]
        records = history.list(**filters, limit=50)  # type: ignore[arg-type]
        if [r.job_id for r in records] != want_ids:
            raise SeedCheckError(f"list({filters}, limit=50) is not the newest 50 in order")
        for record in records:
            check_record(record, next(s for s in seeded if s.job_id == record.job_id))
    direct = _expected(seeded, run_mode="direct")
    window = history.list(run_mode="direct", limit=260, offset=min(150, len(direct)))
    if [r.job_id for r in window] != [s.job_id for s in direct[150:410]]:
        raise SeedCheckError("list(run_mode='direct', limit=260, offset=150) pages wrongly")
    rng = random.Random(size)
    for index in [*range(min(size, BulkSeeder.TEMPLATE_JOBS)), *rng.sample(range(size), 10)]:
        s = by_index[index]
        check_record(history.get(s.job_id), s)
    log(f"history reads back all {size} jobs as recorded (counts, pages, records, get)")


def check_shape(settings: Settings, seeder: BulkSeeder, copies: list[Seeded]) -> None:
    """A bulk copy of each template reads through Prefect's API like the run Prefect wrote:
    same fields (except those that differ between any two jobs), same state history."""
    from prefect.client.orchestration import get_client

    varying = {
        "id", "name", "parameters", "tags", "idempotency_key", "created", "updated",
        "expected_start_time", "next_scheduled_start_time", "start_time", "end_time",
        "state_id", "state", "estimated_start_time_delta", "estimated_run_time",
    }  # fmt: skip
    with prefect_settings(settings), get_client(sync_client=True) as client:
        for template in seeder.template_seeded:
            copy = next((c for c in copies if c.index % 10 == template.index % 10), None)
            if copy is None:
                continue
            want = client.read_flow_run(uuid.UUID(template.flow_run_id))
            got = client.read_flow_run(uuid.UUID(copy.flow_run_id))
            a, b = want.model_dump(exclude=varying), got.model_dump(exclude=varying)
            diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
            want_states = [
                (st.type, st.name, st.message)
                for st in client.read_flow_run_states(uuid.UUID(template.flow_run_id))
            ]
            got_states = [
                (st.type, st.name, st.message)
                for st in client.read_flow_run_states(uuid.UUID(copy.flow_run_id))
            ]
            assert want.state is not None and got.state is not None
            if (
                diff
                or want_states != got_states
                or (want.state.type, want.state.name) != (got.state.type, got.state.name)
                or set(want.parameters) != set(got.parameters)
                or set(want.parameters["job"]) != set(got.parameters["job"])
                or sorted(t.split(":")[0] for t in want.tags)
                != sorted(t.split(":")[0] for t in got.tags)
            ):
                raise SeedCheckError(
                    f"bulk copy of template {template.index} differs from Prefect's row: "
                    f"{diff} states {want_states} vs {got_states}"
                )
    log("bulk rows read through Prefect's API like the rows Prefect wrote")


# -- the history benchmark ---------------------------------------------------------------------


def timed(call: Callable[[], Any], calls: int) -> tuple[list[float], Any]:
    call()  # warm-up
    times = []
    result = None
    for _ in range(calls):
        started = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - started) * 1000)
    return times, result


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def history_bench(
    backend: str, sizes: list[int], calls: int, threads: int, seeding: str
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        database = (
            stack.enter_context(throwaway_database("history")) if backend == "postgresql" else None
        )
        settings = stack.enter_context(prefect_server(backend, PORTS[backend], database))
        deployment = JobService(settings, start_server=False).deploy()
        history = JobHistoryStore(settings)
        seeder = BulkSeeder(settings, deployment.deployment_id, max(sizes))
        seeded: list[Seeded] = []
        seed_total = 0.0
        for size in sizes:
            started = time.monotonic()
            recorded = len(seeded)
            if seeding == "api":
                seeded += seed_api(settings, deployment.deployment_id, recorded, size, threads)
            else:
                if not seeded:
                    seeded += seeder.seed_templates()
                copies = seeder.seed(len(seeded), size)
                if recorded == 0:
                    check_shape(settings, seeder, copies)
                seeded += copies
            seconds = time.monotonic() - started
            seed_total += seconds
            log(f"{backend}: {size - recorded} jobs recorded in {seconds:.1f} s (now {size})")
            verify_history(history, seeded, size)
            queries: list[tuple[str, Callable[[], Any]]] = [
                ("list(run_mode='queue', limit=50)", lambda: history.list(run_mode="queue")),
                ("list(status='failed', limit=50)", lambda: history.list(status="failed")),
                (
                    "list(prompt_pack_id='pack-3', limit=50) [1.4% of jobs]",
                    lambda: history.list(prompt_pack_id="pack-3"),
                ),
                ("count()", lambda: history.count()),
                ("count(run_mode='queue')", lambda: history.count(run_mode="queue")),
                ("count(status='failed')", lambda: history.count(status="failed")),
                (
                    "Prefect read_flow_runs (full FlowRun), filter of row 1",
                    lambda: raw_page(settings),
                ),
                ("bare HTTP POST, filter of row 1, unparsed (bytes)", lambda: raw_http(settings)),
            ]
            for label, query in queries:
                load = load_average()
                times, result = timed(query, calls)
                got = len(result) if isinstance(result, list) else result
                rows.append(
                    {
                        "backend": backend,
                        "jobs": size,
                        "query": label,
                        "median_ms": statistics.median(times),
                        "p90_ms": p90(times),
                        "calls": calls,
                        "result": got,
                        "load": load,
                        "seed_s": seconds,
                        "seeded_jobs": size,
                        "seed_total_s": seed_total,
                    }
                )
                log(
                    f"{backend} {size}: {label} median {statistics.median(times):.0f} ms, "
                    f"p90 {p90(times):.0f} ms -> {got} (load {load})"
                )
    return rows


# -- 2. throughput ---------------------------------------------------------------------------


def drain(base: Settings, n_jobs: int, n_workers: int, steps: int, step_seconds: float) -> dict:
    """Queue ``n_jobs`` on a fresh pool (limit ``n_workers``); drain it with that many workers."""
    tag = uuid.uuid4().hex[:6]
    settings = base.model_copy(
        update={
            "work_pool": f"tput{n_workers}-{tag}",
            "deployment_name": f"tput{n_workers}-{tag}",
            "output_dir": WORKDIR / f"outputs-{n_workers}",
        }
    )
    pack = f"tput{n_workers}-{tag}"
    config = SEED_CONFIG.model_copy(update={"steps": steps})
    jobs = [
        make_job(
            config,
            run_mode="queue",
            source="add_to_queue",
            prompt_source="pack",
            prompt_pack_id=pack,
        )
        for _ in range(n_jobs)
    ]
    with ExitStack() as stack:
        sims = [
            stack.enter_context(SimulatorProcess(step_seconds=step_seconds))
            for _ in range(n_workers)
        ]
        service = JobService(settings, start_server=False)
        service.deploy(gpus=n_workers)
        service.pause()
        for job in jobs:
            service.submit_queued(job)
        workers: list[Worker] = []
        stack.callback(lambda: [w.stop() for w in workers])
        for i, sim in enumerate(sims, start=1):
            workers.append(Worker(settings.model_copy(update={"webui_url": sim.url}), f"gpu-{i}"))
        wait_for(lambda: all(w.serving() for w in workers), timeout=180)
        history = JobHistoryStore(settings)
        resumed = datetime.now().astimezone()
        service.resume()
        log(f"throughput: {n_jobs} jobs, {n_workers} worker(s) serving; pool resumed")

        def drained() -> bool:
            for w in workers:
                if w.process.poll() is not None:
                    raise RuntimeError(f"worker died: {w.log.read_text(errors='replace')[-2000:]}")
            return history.count(prompt_pack_id=pack, status=TERMINAL) == n_jobs

        wait_for(drained, timeout=60 + n_jobs * 10, poll=0.5)
        records = history.list(prompt_pack_id=pack, limit=n_jobs + 10)
        statuses = Counter(r.status for r in records)
        ends = [r.finished_at for r in records if r.finished_at is not None]
        starts = [r.started_at for r in records if r.started_at is not None]
        drain_s = (max(ends) - resumed).total_seconds()
        per_job: Counter[str] = Counter()
        per_sim = []
        for sim in sims:
            generations = sim.stats()["generations"]
            per_sim.append(len(generations))
            for g in generations:
                per_job[str(g.get("force_task_id") or "")[:32]] += 1
        counts = Counter(per_job.get(job.job_id, 0) for job in jobs)
    return {
        "workers": n_workers,
        "jobs": n_jobs,
        "drain_s": drain_s,
        "jobs_per_s": n_jobs / drain_s,
        "first_start_s": (min(starts) - resumed).total_seconds() if starts else float("nan"),
        "statuses": dict(statuses),
        "per_sim": per_sim,
        "lost": counts.get(0, 0),
        "doubled": sum(v for k, v in counts.items() if k > 1),
        "generation_s": steps * step_seconds,
    }


def throughput_bench(n_jobs: int, steps: int, step_seconds: float) -> list[dict[str, Any]]:
    with (
        throwaway_database("throughput") as database,
        prefect_server("throughput", PORTS["throughput"], database) as settings,
    ):
        one = drain(settings, n_jobs, 1, steps, step_seconds)
        log(f"one worker: {one}")
        two = drain(settings, n_jobs, 2, steps, step_seconds)
        log(f"two workers: {two}")
    return [one, two]


# -- output ----------------------------------------------------------------------------------


def history_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="History query latency (JobHistoryStore, HTTP to a local Prefect server)")
    columns = ("backend", "jobs", "query", "median ms", "p90 ms", "calls", "result", "load avg")
    for column in columns:
        table.add_column(column, justify="left" if column in ("backend", "query") else "right")
    for r in rows:
        table.add_row(
            r["backend"],
            f"{r['jobs']:,}",
            r["query"],
            f"{r['median_ms']:.0f}",
            f"{r['p90_ms']:.0f}",
            str(r["calls"]),
            str(r["result"]),
            r["load"],
        )
    return table


def seeding_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Seeding (time per step; see --seeding)")
    for column in ("backend", "up to jobs", "seconds for this step", "jobs/s"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    seen = set()
    previous: dict[str, int] = {}
    for r in rows:
        key = (r["backend"], r["jobs"])
        if key in seen:
            continue
        seen.add(key)
        added = r["jobs"] - previous.get(r["backend"], 0)
        previous[r["backend"]] = r["jobs"]
        table.add_row(
            r["backend"], f"{r['jobs']:,}", f"{r['seed_s']:.1f}", f"{added / r['seed_s']:.0f}"
        )
    return table


def throughput_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Queue throughput on PostgreSQL (stablenew worker processes)")
    columns = (
        "workers", "jobs", "gen s/job", "drain s", "jobs/s", "first start s",
        "statuses", "generations per sim", "lost", "doubled",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["workers"]),
            str(r["jobs"]),
            f"{r['generation_s']:.2f}",
            f"{r['drain_s']:.1f}",
            f"{r['jobs_per_s']:.2f}",
            f"{r['first_start_s']:.1f}",
            ", ".join(f"{k} {v}" for k, v in sorted(r["statuses"].items())),
            " + ".join(str(n) for n in r["per_sim"]),
            str(r["lost"]),
            str(r["doubled"]),
        )
    if len(rows) == 2:
        ratio = rows[1]["jobs_per_s"] / rows[0]["jobs_per_s"]
        table.caption = f"two workers / one worker: {ratio:.2f}x jobs/s"
    return table


def markdown(table: Table) -> str:
    headers = [str(c.header) for c in table.columns]
    cells = [list(c.cells) for c in table.columns]
    lines = [f"**{table.title}**", "", "| " + " | ".join(headers) + " |"]
    lines.append("|" + "---|" * len(headers))
    for i in range(len(cells[0]) if cells else 0):
        lines.append("| " + " | ".join(str(col[i]) for col in cells) + " |")
    if table.caption:
        lines += ["", str(table.caption)]
    return "\n".join(lines) + "\n"


def library() -> str:
    """Where stablenew_core is imported from, its commit, and whether history.py is edited."""
    import stablenew_core

    repo = Path(stablenew_core.__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        edited = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "stablenew_core/history.py"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return f"{repo} (not a git checkout)"
    return f"{repo} at {head}" + (" (history.py edited)" if edited else "")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="cumulative job counts")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--jobs", type=int, default=40, help="queued jobs per throughput run")
    parser.add_argument("--only", default="history,throughput")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per query (>= 20)")
    parser.add_argument(
        "--seeding",
        choices=("bulk", "api"),
        default="bulk",
        help="bulk: copies of API-made rows through Prefect's server ORM (fast); "
        "api: every job through Prefect's API (~10 jobs/s)",
    )
    parser.add_argument(
        "--pg-threads", type=int, default=4, help="API seeding threads on PostgreSQL"
    )
    parser.add_argument("--steps", type=int, default=10, help="sampling steps per queued job")
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--markdown", type=Path, help="also write the tables as Markdown")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    only = {o.strip() for o in args.only.split(",")}
    unknown = (set(backends) - {"sqlite", "postgresql"}) | (only - {"history", "throughput"})
    if unknown:
        parser.error(f"unknown: {sorted(unknown)}")

    # SIGTERM unwinds like Ctrl-C, so every finally below runs.
    signal.signal(signal.SIGTERM, _interrupt)
    tables: list[Table] = []
    started = time.monotonic()
    try:
        if "history" in only:
            rows: list[dict[str, Any]] = []
            for backend in backends:
                threads = args.pg_threads if backend == "postgresql" else 1
                rows += history_bench(backend, sizes, args.calls, threads, args.seeding)
            tables += [history_table(rows), seeding_table(rows)]
        if "throughput" in only:
            tables.append(
                throughput_table(throughput_bench(args.jobs, args.steps, args.step_seconds))
            )
    finally:
        shutil.rmtree(WORKDIR, ignore_errors=True)
    for table in tables:
        console.print(table)
    measured = f"only {sorted(only)}; sizes {sizes}; backends {backends}; jobs {args.jobs}"
    console.print(f"total {time.monotonic() - started:.0f} s; {measured}; library {library()}")
    if args.markdown:
        args.markdown.write_text("\n".join(markdown(t) for t in tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
