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
from datetime import datetime
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
from stablenew_core.jobs import Job, make_job  # noqa: E402
from stablenew_core.prefect_env import prefect_settings, process_env  # noqa: E402
from stablenew_core.server import LocalServer  # noqa: E402
from stablenew_core.settings import settings_env  # noqa: E402
from stablenew_core.webui.process import SimulatorProcess  # noqa: E402

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_BASE = "postgresql+asyncpg://postgres@127.0.0.1:5432"
TERMINAL = ("completed", "failed", "cancelled", "crashed")
SEED_CONFIG = PipelineConfig(prompt="a lantern in fog", steps=5, width=64, height=64, seed=9)
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


def seed_job(i: int) -> Job:
    """Job number ``i``: 70% queue / 30% direct, a few sources, every 10th from a pack."""
    from_pack = i % 10 == 0
    return make_job(
        SEED_CONFIG,
        run_mode="direct" if i % 10 in (3, 6, 9) else "queue",
        source=("add_to_queue", "run", "run_now")[i % 3],
        prompt_source="pack" if from_pack else "manual",
        prompt_pack_id=f"pack-{i % 7}" if from_pack else None,
    )


def seed(settings: Settings, deployment_id: Any, start: int, stop: int, threads: int) -> None:
    """Record jobs ``start..stop-1``: 30% forced Completed, 10% Failed, the rest Scheduled."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Failed

    errors: list[BaseException] = []

    def work(indices: range) -> None:
        try:
            with prefect_settings(settings), get_client(sync_client=True) as client:
                for i in indices:
                    job = seed_job(i)
                    run = client.create_flow_run_from_deployment(
                        deployment_id,
                        parameters={"job": job.model_dump(mode="json")},
                        tags=job.tags(),
                    )
                    if i % 10 in (0, 1, 2):
                        client.set_flow_run_state(run.id, Completed(), force=True)
                    elif i % 10 == 4:
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


def raw_page(settings: Settings) -> list[Any]:
    """Prefect's own call under list(run_mode='queue'): no artifacts read, no records built."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    tags = FlowRunFilterTags(all_=filter_tags(run_mode="queue"))
    with prefect_settings(settings), get_client(sync_client=True) as client:
        return list(
            client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=tags),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=50,
            )
        )


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


def history_bench(backend: str, sizes: list[int], calls: int, threads: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        database = (
            stack.enter_context(throwaway_database("history")) if backend == "postgresql" else None
        )
        settings = stack.enter_context(prefect_server(backend, PORTS[backend], database))
        deployment = JobService(settings, start_server=False).deploy()
        history = JobHistoryStore(settings)
        recorded = 0
        seed_total = 0.0
        for size in sizes:
            started = time.monotonic()
            seed(settings, deployment.deployment_id, recorded, size, threads)
            seeded = time.monotonic() - started
            seed_total += seeded
            log(f"{backend}: {size - recorded} jobs recorded in {seeded:.1f} s (now {size})")
            recorded = size
            total = history.count()
            if total != size:
                raise RuntimeError(
                    f"{backend}: expected {size} jobs in history, count() says {total}"
                )
            queries: list[tuple[str, Callable[[], Any]]] = [
                ("list(run_mode='queue', limit=50)", lambda: history.list(run_mode="queue")),
                ("list(status='failed', limit=50)", lambda: history.list(status="failed")),
                ("count(run_mode='queue')", lambda: history.count(run_mode="queue")),
                ("raw read_flow_runs, same filter as row 1", lambda: raw_page(settings)),
            ]
            for label, query in queries:
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
                        "seed_s": seeded,
                        "seeded_jobs": size,
                        "seed_total_s": seed_total,
                    }
                )
                log(
                    f"{backend} {size}: {label} median {statistics.median(times):.0f} ms, "
                    f"p90 {p90(times):.0f} ms -> {got}"
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
    for column in ("backend", "jobs", "query", "median ms", "p90 ms", "calls", "result"):
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
        )
    return table


def seeding_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Seeding (create_flow_run_from_deployment + forced states for 40%)")
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


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="cumulative job counts")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--jobs", type=int, default=40, help="queued jobs per throughput run")
    parser.add_argument("--only", default="history,throughput")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per query (>= 20)")
    parser.add_argument("--pg-threads", type=int, default=4, help="seeding threads on PostgreSQL")
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
                rows += history_bench(backend, sizes, args.calls, threads)
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
    console.print(f"total {time.monotonic() - started:.0f} s; {measured}")
    if args.markdown:
        args.markdown.write_text("\n".join(markdown(t) for t in tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
