"""Queue and direct-mode benchmark for stablenew_core, against stock Prefect, in one run.

Not a test (never collected by pytest: ``testpaths = ["tests"]``). Run it with the project's
venv::

    .venv/bin/python bench/queue_bench.py                       # every section, default sizes
    .venv/bin/python bench/queue_bench.py --only gap,submit --jobs 10 --submits 5
    .venv/bin/python bench/queue_bench.py --runs 3 --markdown bench/last.md

What it measures (each section selectable with ``--only``):

``gap``     GPU idle gap between consecutive queued jobs, measured AT THE WEBUI from the
            simulator's own timestamps (end of job i's last generation -> start of job i+1's
            first generation), for ``--jobs`` jobs queued before the worker starts. Served by
            (a) ``stablenew worker`` and (b) ``prefect worker start --type process``
            (``PREFECT_WORKER_QUERY_SECONDS=1``; the deployment sets the ``command`` job
            variable). Median / p90 gap, drain time (first start -> last finish), and where the
            gap goes, from the flow runs' state timestamps (Completed, Pending, Running).
``submit``  submit -> start with the worker idle: ``JobService.submit_queued`` returning -> the
            simulator's ``started_at`` of the job's first generation, jobs submitted one at a
            time (each after the previous one finished, plus a random 1-2 s pause so the
            stock worker's 1 s poll phase is not aligned).
``direct``  direct-mode overhead at ``step_seconds=0``: wall time of
            ``PipelineController(settings=...).run(config)`` minus the median wall time of the same
            pipeline code without Prefect (``run_stage`` for each planned stage +
            ``write_manifest``, the controller's own warm WebUI client, same config), calls
            interleaved. "Stock" is a plain ``@flow`` with one ``@task`` running the same code,
            called synchronously in a child process that never imports
            ``stablenew_core.runner``/``service``/``controller`` (so our heartbeat-join patch,
            ``stablenew_core._prefect_internals.install``, is not applied; the child checks and
            reports it) with its own interleaved no-Prefect baseline.
``stall``   ``--stall-calls`` direct calls on the backend of the server this script starts
            (SQLite, or ``--database-url``): how many take > 1 s, and whether every task run was
            recorded (``POST /task_runs/count`` over the calls' flow runs after a settle). The
            stock flow is run the same number of times for comparison.
``drain``   ``--drain-jobs`` queued jobs drained by ``stablenew worker``: none lost (every flow
            run Completed, every job generated), none run twice (generations per job id from
            the simulator's ``force_task_id``), never two at once (simulator ``max_concurrent``
            == 1 and no overlapping [started, finished] intervals).

Everything runs on its own: a Prefect server (``LocalServer``, temp ``STABLENEW_HOME``, a free
port on 127.0.0.1), a WebUI simulator, unique work pools per section and run. Everything it
starts is stopped on exit, Ctrl-C or error; every child carries ``STABLENEW_BENCH_TOKEN`` in its
environment and a final sweep of /proc kills (and reports) any straggler that carries it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
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
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SECTIONS = ("gap", "submit", "direct", "stall", "drain")
TOKEN_VAR = "STABLENEW_BENCH_TOKEN"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")

# Telemetry off before anything imports Prefect, in this process and (inherited) every child.
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"


# ---------------------------------------------------------------------------------------------
# Small statistics helpers
# ---------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def p90(values: Sequence[float]) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def iso_ts(value: Any) -> float:
    """A Prefect timestamp (datetime) as a time.time() float."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    return float(value)


# ---------------------------------------------------------------------------------------------
# Processes: start, stop, and make sure nothing is left
# ---------------------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses
        try:
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (IndexError, ValueError):
            continue
        children[ppid].append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    children = _children_map()
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def processes_with_token(token: str) -> list[int]:
    """Pids (not ours) whose environment carries ``STABLENEW_BENCH_TOKEN=token``."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0") and _alive(int(entry)):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _kill(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    lines: list[tuple[float, str]] = field(default_factory=list)  # (time.time(), line)
    reader: threading.Thread | None = None

    def line_time(self, text: str) -> float | None:
        """When the child first wrote a line containing ``text`` (stamped on arrival)."""
        for stamp, line in list(self.lines):
            if text in line:
                return stamp
        return None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def _pump(child: Child) -> None:
    assert child.process.stdout is not None
    with child.log.open("ab") as out:
        for raw in child.process.stdout:
            stamp = time.time()
            line = raw.decode(errors="replace").rstrip("\n")
            child.lines.append((stamp, line))
            out.write(f"[{stamp:.3f}] {line}\n".encode())
            out.flush()


class Processes:
    """The children this script starts; each in its own session; stopped in reverse order."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def spawn(
        self, name: str, command: list[str], env: dict[str, str], log: Path, *, stamp: bool = False
    ) -> Child:
        """Start a child; with ``stamp`` its output is read through a pipe and every line is
        stamped with its arrival time (``Child.lines``) before it goes to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            process = subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.PIPE if stamp else out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_default_sigint,
            )
        child = Child(name, process, log)
        if stamp:
            child.reader = threading.Thread(target=_pump, args=(child,), daemon=True)
            child.reader.start()
        self.children.append(child)
        return child

    def stop(self, child: Child, timeout: float = 20.0) -> None:
        """SIGTERM (the worker finishes its job), then SIGKILL the group and every descendant."""
        process = child.process
        tree = descendants(process.pid)
        if process.poll() is None:
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        # Prefect's process worker starts each flow run in a new session: kill stragglers.
        leftovers = [pid for pid in tree + descendants(process.pid) if _alive(pid)]
        if leftovers:
            _kill(leftovers, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(_alive(p) for p in leftovers):
                time.sleep(0.1)
            _kill([p for p in leftovers if _alive(p)], signal.SIGKILL)
        if child.reader is not None:
            child.reader.join(timeout=5)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child, timeout=10)


# ---------------------------------------------------------------------------------------------
# The bench context: server, simulator, settings
# ---------------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    token: str
    procs: Processes
    settings: Any = None  # stablenew_core.settings.Settings
    server: Any = None  # LocalServer
    sim: Any = None  # SimulatorProcess
    log: Callable[[str], None] = print
    results: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    phases: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    notes: list[str] = field(default_factory=list)

    def record(self, key: str, who: str, value: float | None) -> None:
        if value is not None:
            self.results[key][who].append(float(value))

    # -- configuration ------------------------------------------------------------------------

    def config(self, prompt: str = "a lighthouse at dusk, benchmark") -> Any:
        from stablenew_core.config import PipelineConfig

        data: dict[str, Any] = {
            "prompt": prompt,
            "steps": self.args.steps,
            "width": self.args.size,
            "height": self.args.size,
            "seed": 1234,
        }
        stages = set(self.args.stages.split(","))
        if "img2img" in stages:
            data["img2img"] = {"enabled": True}
        if "adetailer" in stages:
            data["adetailer"] = {"enabled": True}
        if "upscale" in stages:
            # img2img mode: extras requests carry no task id, so they could not be attributed.
            data["upscale"] = {"enabled": True, "mode": "img2img", "factor": 1.0}
        return PipelineConfig.model_validate(data)

    def pool_settings(self, label: str) -> Any:
        name = f"bench-{label}-{uuid.uuid4().hex[:8]}"
        return self.settings.model_copy(update={"work_pool": name, "deployment_name": name})

    def child_env(self, settings: Any, **extra: str) -> dict[str, str]:
        from stablenew_core.prefect_env import process_env
        from stablenew_core.settings import settings_env

        env = process_env(settings)
        env.update(settings_env(settings))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env[TOKEN_VAR] = self.token
        env.update(extra)
        return env

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        from prefect.client.orchestration import get_client

        from stablenew_core.prefect_env import prefect_settings

        with prefect_settings(self.settings), get_client(sync_client=True) as client:
            yield client


# ---------------------------------------------------------------------------------------------
# Simulator stats -> per-job spans
# ---------------------------------------------------------------------------------------------


def job_of(task_id: str | None) -> str | None:
    """``<job_id>-<stage>-<n>`` -> job id."""
    if not task_id or task_id.count("-") < 2:
        return None
    return task_id.rsplit("-", 2)[0]


@dataclass
class Span:
    first_start: float
    last_finish: float
    generations: int
    intervals: list[tuple[float, float]]


def job_spans(stats: dict[str, Any], job_ids: set[str]) -> dict[str, Span]:
    spans: dict[str, Span] = {}
    for gen in stats["generations"]:
        jid = job_of(gen.get("force_task_id"))
        if jid not in job_ids or gen.get("started_at") is None:
            continue
        assert jid is not None
        start = float(gen["started_at"])
        finish = float(gen["finished_at"]) if gen.get("finished_at") is not None else start
        span = spans.get(jid)
        if span is None:
            spans[jid] = Span(start, finish, 1, [(start, finish)])
        else:
            span.first_start = min(span.first_start, start)
            span.last_finish = max(span.last_finish, finish)
            span.generations += 1
            span.intervals.append((start, finish))
    return spans


def generations_per_job(bench: Bench) -> int:
    from stablenew_core.stages import planned_stages

    config = bench.config()
    return len(planned_stages(config)) * 1  # one request per stage per image (batch of 1)


# ---------------------------------------------------------------------------------------------
# Prefect helpers
# ---------------------------------------------------------------------------------------------


def count_terminal(client: Any, flow_run_ids: Sequence[str]) -> int:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    total = 0
    for chunk in _chunks(list(flow_run_ids), 100):
        total += client.count_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[uuid.UUID(i) for i in chunk]),
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType(t) for t in TERMINAL])
                ),
            )
        )
    return total


def final_states(client: Any, flow_run_ids: Sequence[str]) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    states: dict[str, str] = {}
    for chunk in _chunks(list(flow_run_ids), 100):
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(i) for i in chunk])),
            limit=len(chunk),
        )
        for run in runs:
            states[str(run.id)] = run.state_type.value if run.state_type else "?"
    return states


def count_task_runs(bench: Bench, flow_run_ids: Sequence[str]) -> int:
    """``POST /task_runs/count`` over the given flow runs (Prefect's public REST API)."""
    import httpx

    total = 0
    with httpx.Client(base_url=bench.settings.local_api_url, timeout=30) as http:
        for chunk in _chunks(list(flow_run_ids), 100):
            response = http.post("/task_runs/count", json={"flow_runs": {"id": {"any_": chunk}}})
            response.raise_for_status()
            total += int(response.json())
    return total


def state_times(client: Any, flow_run_id: str) -> dict[str, float]:
    """Timestamps of the run's last Pending, first Running and terminal state."""
    out: dict[str, float] = {}
    states = sorted(client.read_flow_run_states(uuid.UUID(flow_run_id)), key=lambda s: s.timestamp)
    for state in states:
        kind = state.type.value
        ts = iso_ts(state.timestamp)
        if kind == "PENDING":
            out["pending"] = ts
        elif kind == "RUNNING" and "running" not in out:
            out["running"] = ts
        elif kind in TERMINAL:
            out["terminal"] = ts
    return out


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def wait_until(
    predicate: Callable[[], bool], timeout: float, poll: float, what: str, child: Child | None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if child is not None and child.process.poll() is not None:
            raise RuntimeError(
                f"{child.name} exited (code {child.process.returncode}) while waiting for "
                f"{what}; last lines of its log:\n{_tail(child.output())}"
            )
        if time.monotonic() > deadline:
            tail = f"\nlast lines of {child.name}'s log:\n{_tail(child.output())}" if child else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(poll)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


def deploy(settings: Any) -> Any:
    from stablenew_core.service import JobService

    service = JobService(settings, start_server=False)
    service.deploy()
    return service


def start_worker(bench: Bench, kind: str, settings: Any, label: str) -> Child:
    log = bench.tmp / "logs" / f"{label}-{kind}-{settings.work_pool}.log"
    if kind == "ours":
        command = [sys.executable, "-m", "stablenew_core.cli", "worker"]
        # Unbuffered and wide: each "<job id> <status>" line (printed by run_forever's on_job)
        # arrives at once and on one line, so its arrival time splits the hand-over.
        env = bench.child_env(settings, PYTHONUNBUFFERED="1", COLUMNS="250")
    else:
        command = [
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            settings.work_pool,
            "--type",
            "process",
        ]
        env = bench.child_env(settings, PREFECT_WORKER_QUERY_SECONDS="1")
    return bench.procs.spawn(f"{kind} worker ({label})", command, env, log, stamp=kind == "ours")


def wait_worker_online(bench: Bench, child: Child, pool: str) -> None:
    with bench.client() as client:

        def online() -> bool:
            try:
                return bool(client.read_workers_for_work_pool(pool))
            except Exception:
                return False

        wait_until(online, 180, 0.5, f"a worker online in pool {pool}", child)


def queue_jobs(bench: Bench, service: Any, count: int, label: str) -> list[tuple[str, str]]:
    """Submit ``count`` queue jobs; return (job id, flow run id) in submission order."""
    from stablenew_core.controller import PipelineController

    controller = PipelineController(service)
    out = []
    for number in range(count):
        job = controller.build_job(
            bench.config(f"{label} job {number}"),
            run_mode="queue",
            source="add_to_queue",
            prompt_source="manual",
        )
        record = service.submit_queued(job)
        out.append((job.job_id, str(record.flow_run_id)))
    return out


def proc_usage(pid: int) -> dict[str, float] | None:
    """Threads, open file descriptors and RSS (MB) of a live process, from /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "threads": float(values["Threads"].strip()),
        "fds": float(fds),
        "rss_mb": float(values["VmRSS"].split()[0]) / 1024,
    }


def wait_drained(
    bench: Bench,
    jobs: list[tuple[str, str]],
    child: Child,
    per_job_timeout: float,
    on_poll: Callable[[int], None] | None = None,
) -> None:
    """Poll the simulator (not Prefect) until every job generated, then Prefect until terminal.

    ``on_poll(jobs generated so far)`` is called at every poll of the simulator."""
    ids = {jid for jid, _ in jobs}
    want = generations_per_job(bench)
    timeout = 120 + per_job_timeout * len(jobs)

    def generated() -> bool:
        spans = job_spans(bench.sim.stats(), ids)
        if on_poll is not None:
            on_poll(len(spans))
        return len(spans) == len(ids) and all(s.generations >= want for s in spans.values())

    wait_until(generated, timeout, 1.0, f"{len(jobs)} jobs generated", child)
    with bench.client() as client:
        runs = [fid for _, fid in jobs]
        wait_until(
            lambda: count_terminal(client, runs) == len(runs),
            120,
            0.5,
            "flow runs terminal",
            child,
        )


# ---------------------------------------------------------------------------------------------
# Section: gap
# ---------------------------------------------------------------------------------------------


def gap_phases(
    client: Any, ordered: list[tuple[str, str]], spans: dict[str, Span], child: Child
) -> dict[str, list[float]]:
    """Split each gap into: tail (WebUI answer -> run terminal), hand-over (terminal -> next
    Pending), start-up (Pending -> Running) and head (Running -> first WebUI request).

    For ``stablenew worker`` the hand-over is split again at the arrival of the worker's
    ``<job id> <status>`` line, printed by ``run_forever``'s ``on_job`` once ``run_flow`` has
    returned and the record is built: engine exit | poll + claim."""
    times = {fid: state_times(client, fid) for _, fid in ordered}
    phases: dict[str, list[float]] = defaultdict(list)
    for (jid_a, fid_a), (jid_b, fid_b) in itertools.pairwise(ordered):
        a, b = times[fid_a], times[fid_b]
        if not {"terminal"} <= a.keys() or not {"pending", "running"} <= b.keys():
            continue
        phases["tail: WebUI answered -> run Completed"].append(
            a["terminal"] - spans[jid_a].last_finish
        )
        phases["hand-over: Completed -> next Pending"].append(b["pending"] - a["terminal"])
        printed = child.line_time(jid_a)
        if printed is not None:
            phases["  of which: Completed -> worker printed the job (engine exit)"].append(
                printed - a["terminal"]
            )
            phases["  of which: printed -> next Pending (poll + claim)"].append(
                b["pending"] - printed
            )
        phases["start-up: Pending -> Running"].append(b["running"] - b["pending"])
        phases["head: Running -> first WebUI request"].append(
            spans[jid_b].first_start - b["running"]
        )
    return phases


def section_gap(bench: Bench, run: int) -> None:
    bench.sim.set_step_seconds(bench.args.step_seconds)
    for kind in ("ours", "stock"):
        settings = bench.pool_settings(f"gap{run}-{kind}")
        service = deploy(settings)
        jobs = queue_jobs(bench, service, bench.args.jobs, f"gap {kind}")
        bench.sim.reset()
        bench.log(f"  gap/{kind}: {len(jobs)} jobs queued; starting the worker")
        started = time.time()
        child = start_worker(bench, kind, settings, f"gap{run}")
        try:
            wait_drained(bench, jobs, child, per_job_timeout=30)
        finally:
            bench.procs.stop(child)
        stats = bench.sim.stats()
        spans = job_spans(stats, {jid for jid, _ in jobs})
        ordered = sorted(jobs, key=lambda j: spans[j[0]].first_start)
        gaps = [
            spans[b].first_start - spans[a].last_finish
            for (a, _), (b, _) in itertools.pairwise(ordered)
        ]
        drain = spans[ordered[-1][0]].last_finish - spans[ordered[0][0]].first_start
        busy = sum(s.last_finish - s.first_start for s in spans.values())
        bench.record("gap_median", kind, median(gaps))
        bench.record("gap_p90", kind, p90(gaps))
        bench.record("gap_max", kind, max(gaps) if gaps else None)
        bench.record("gap_drain", kind, drain)
        bench.record("gap_busy", kind, busy / drain if drain else None)
        bench.record("gap_first", kind, spans[ordered[0][0]].first_start - started)
        with bench.client() as client:
            for name, values in gap_phases(client, ordered, spans, child).items():
                bench.phases[f"gap / {name}"][kind].append(median(values) or 0.0)
        bench.log(
            f"  gap/{kind}: median {median(gaps):.3f}s p90 {p90(gaps):.3f}s, "
            f"drain {drain:.1f}s, max_concurrent {stats['max_concurrent']}"
        )


# ---------------------------------------------------------------------------------------------
# Section: submit -> start
# ---------------------------------------------------------------------------------------------


def section_submit(bench: Bench, run: int) -> None:
    from stablenew_core.controller import PipelineController

    bench.sim.set_step_seconds(bench.args.step_seconds)
    rng = random.Random(run)
    for kind in ("ours", "stock"):
        settings = bench.pool_settings(f"submit{run}-{kind}")
        service = deploy(settings)
        controller = PipelineController(service)
        child = start_worker(bench, kind, settings, f"submit{run}")
        values: list[float] = []
        calls: list[float] = []
        phases: dict[str, list[float]] = defaultdict(list)
        try:
            wait_worker_online(bench, child, settings.work_pool)
            with bench.client() as client:
                for number in range(bench.args.submits + 1):  # the first one warms up
                    time.sleep(rng.uniform(1.0, 2.0))
                    job = controller.build_job(
                        bench.config(f"submit {kind} {number}"),
                        run_mode="queue",
                        source="add_to_queue",
                        prompt_source="manual",
                    )
                    t0 = time.time()
                    record = service.submit_queued(job)
                    t1 = time.time()
                    fid = str(record.flow_run_id)

                    def started(jid: str = job.job_id) -> bool:
                        return bool(job_spans(bench.sim.stats(), {jid}))

                    wait_until(started, 120, 0.05, f"job {job.job_id} started", child)
                    wait_until(
                        lambda f=fid: count_terminal(client, [f]) == 1,
                        120,
                        0.2,
                        f"flow run {fid} terminal",
                        child,
                    )
                    span = job_spans(bench.sim.stats(), {job.job_id})[job.job_id]
                    if number == 0:
                        continue
                    values.append(span.first_start - t1)
                    calls.append(t1 - t0)
                    st = state_times(client, fid)
                    if {"pending", "running"} <= st.keys():
                        phases["submitted -> Pending (poll + claim)"].append(st["pending"] - t1)
                        phases["Pending -> Running"].append(st["running"] - st["pending"])
                        phases["Running -> first WebUI request"].append(
                            span.first_start - st["running"]
                        )
        finally:
            bench.procs.stop(child)
        bench.record("submit_median", kind, median(values))
        bench.record("submit_p90", kind, p90(values))
        bench.record("submit_call", kind, median(calls))
        for name, vals in phases.items():
            bench.phases[f"submit / {name}"][kind].append(median(vals) or 0.0)
        bench.log(f"  submit/{kind}: median {median(values):.3f}s over {len(values)} jobs")


# ---------------------------------------------------------------------------------------------
# Section: direct (and the no-Prefect baseline)
# ---------------------------------------------------------------------------------------------


def run_baseline(client: Any, settings: Any, job: Any) -> None:
    """The pipeline's code without Prefect: every planned stage, then the manifest."""
    from stablenew_core.outputs import job_output_dir, write_manifest
    from stablenew_core.stages import planned_stages, run_stage

    job_dir = job_output_dir(settings.outputs, job)
    previous = None
    results = []
    for stage in planned_stages(job.config):
        previous = run_stage(
            client, job, stage, previous, job_dir, poll_seconds=settings.progress_poll_seconds
        )
        results.append(previous)
    write_manifest(job, results, job_dir)


def direct_calls(bench: Bench, calls: int, warmup: int = 3) -> dict[str, Any]:
    """Interleaved: no-Prefect baseline, then ``PipelineController.run``; wall times."""
    from stablenew_core.controller import PipelineController

    controller = PipelineController(settings=bench.settings)
    client = controller.service.runner.runtime.client  # the same warm client the flow uses
    baseline: list[float] = []
    direct: list[float] = []
    flow_run_ids: list[str] = []
    failed = 0
    for number in range(warmup + calls):
        job = controller.build_job(
            bench.config(f"baseline {number}"),
            run_mode="direct",
            source="run",
            prompt_source="manual",
        )
        t0 = time.perf_counter()
        run_baseline(client, bench.settings, job)
        t1 = time.perf_counter()
        (record,) = controller.run(bench.config(f"direct {number}"))
        t2 = time.perf_counter()
        if number < warmup:
            continue
        baseline.append(t1 - t0)
        direct.append(t2 - t1)
        flow_run_ids.append(str(record.flow_run_id))
        if record.status != "completed":
            failed += 1
    return {"baseline": baseline, "flow": direct, "flow_run_ids": flow_run_ids, "failed": failed}


def stock_direct_calls(bench: Bench, calls: int, label: str) -> dict[str, Any]:
    out = bench.tmp / f"stock-direct-{label}.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-stock-direct",
        "--child-out",
        str(out),
        "--calls",
        str(calls),
        "--steps",
        str(bench.args.steps),
        "--size",
        str(bench.args.size),
        "--stages",
        bench.args.stages,
    ]
    child = bench.procs.spawn(
        f"stock direct ({label})",
        command,
        bench.child_env(bench.settings),
        bench.tmp / "logs" / f"stock-direct-{label}.log",
    )
    try:
        wait_until(
            lambda: child.process.poll() is not None,
            300 + 10 * calls,
            0.5,
            "the stock direct child",
            None,
        )
    finally:
        bench.procs.stop(child)
    if child.process.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"the stock direct child failed (code {child.process.returncode}):\n"
            f"{_tail(child.output(), 40)}"
        )
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def overheads(data: dict[str, Any]) -> list[float]:
    base = median(data["baseline"]) or 0.0
    return [wall - base for wall in data["flow"]]


def section_direct(bench: Bench, run: int) -> None:
    bench.sim.set_step_seconds(0)
    from stablenew_core.history import JobHistoryStore

    history = JobHistoryStore(bench.settings)
    find_times = []
    for _ in range(10):
        t0 = time.perf_counter()
        history.find(uuid.uuid4().hex)
        find_times.append(time.perf_counter() - t0)
    # Not on the direct path any more (d052eda: the repeat check is the flow run's creation
    # with an idempotency key); kept as the cost of a lookup by job id.
    bench.phases["direct / history.find by job id (not on the direct path)"]["ours"].append(
        median(find_times) or 0.0
    )
    for kind in ("ours", "stock"):
        if kind == "ours":
            data = direct_calls(bench, bench.args.calls)
        else:
            data = stock_direct_calls(bench, bench.args.calls, f"direct{run}")
            check = data["isolation"]
            if check["runner_imported"] or check["patched"]:
                raise RuntimeError(f"stock child not isolated: {check}")
        if data["failed"]:
            raise RuntimeError(f"{data['failed']} {kind} direct calls did not complete")
        over = overheads(data)
        bench.record("direct_median", kind, median(over))
        bench.record("direct_p90", kind, p90(over))
        bench.record("direct_gt1", kind, sum(1 for w in data["flow"] if w > 1.0))
        bench.record("direct_wall", kind, median(data["flow"]))
        bench.record("direct_base", kind, median(data["baseline"]))
        bench.log(
            f"  direct/{kind}: overhead median {median(over):.3f}s p90 {p90(over):.3f}s, "
            f"baseline {median(data['baseline']):.3f}s, "
            f"> 1 s: {sum(1 for w in data['flow'] if w > 1.0)}/{len(data['flow'])}"
        )


# ---------------------------------------------------------------------------------------------
# Section: stall (direct calls > 1 s, task runs recorded)
# ---------------------------------------------------------------------------------------------


def section_stall(bench: Bench, run: int) -> None:
    from stablenew_core.stages import planned_stages

    bench.sim.set_step_seconds(0)
    stages = len(planned_stages(bench.config()))
    for kind in ("ours", "stock"):
        if kind == "stock" and not bench.args.stall_stock:
            continue
        if kind == "ours":
            data = direct_calls(bench, bench.args.stall_calls, warmup=1)
            per_job = 1 + stages  # the job task + one task per stage
        else:
            data = stock_direct_calls(bench, bench.args.stall_calls, f"stall{run}")
            per_job = 1
        walls = data["flow"]
        runs = data["flow_run_ids"]
        expected = per_job * len(runs)
        # Settle: task runs travel as events and are written by the server's recorder.
        time.sleep(bench.args.settle)
        recorded = count_task_runs(bench, runs)
        extra_wait = 0.0
        deadline = time.monotonic() + 60
        while recorded < expected and time.monotonic() < deadline:
            time.sleep(2)
            extra_wait += 2
            recorded = count_task_runs(bench, runs)
        bench.record("stall_gt1", kind, sum(1 for w in walls if w > 1.0))
        bench.record("stall_wall", kind, median(walls))
        bench.record("stall_p90", kind, p90(walls))
        bench.record("stall_max", kind, max(walls))
        bench.record("stall_missing", kind, expected - recorded)
        bench.record("stall_failed", kind, data["failed"])
        bench.log(
            f"  stall/{kind}: > 1 s: {sum(1 for w in walls if w > 1.0)}/{len(walls)}, "
            f"task runs {recorded}/{expected} (settled {bench.args.settle + extra_wait:.0f}s), "
            f"failed {data['failed']}"
        )


# ---------------------------------------------------------------------------------------------
# Section: drain
# ---------------------------------------------------------------------------------------------


def section_drain(bench: Bench, run: int) -> None:
    bench.sim.set_step_seconds(bench.args.drain_step_seconds)
    settings = bench.pool_settings(f"drain{run}")
    service = deploy(settings)
    t0 = time.perf_counter()
    jobs = queue_jobs(bench, service, bench.args.drain_jobs, "drain")
    submit_seconds = time.perf_counter() - t0
    bench.sim.reset()
    bench.log(f"  drain: {len(jobs)} jobs queued in {submit_seconds:.1f}s; starting our worker")
    child = start_worker(bench, "ours", settings, f"drain{run}")
    usage: dict[str, tuple[int, dict[str, float]]] = {}

    def sample(done: int) -> None:
        now = proc_usage(child.process.pid)
        if now is None or done < 2:
            return
        usage.setdefault("first", (done, now))
        usage["last"] = (done, now)

    try:
        wait_drained(bench, jobs, child, per_job_timeout=15, on_poll=sample)
    finally:
        bench.procs.stop(child)
    if "first" in usage and usage["last"][0] > usage["first"][0]:
        (n0, u0), (n1, u1) = usage["first"], usage["last"]
        per100 = 100.0 / (n1 - n0)
        bench.record("drain_threads", "ours", (u1["threads"] - u0["threads"]) * per100)
        bench.record("drain_fds", "ours", (u1["fds"] - u0["fds"]) * per100)
        bench.record("drain_rss", "ours", (u1["rss_mb"] - u0["rss_mb"]) * per100)
        bench.log(
            f"  drain: worker after {n0} jobs: {u0['threads']:.0f} threads, {u0['fds']:.0f} fds, "
            f"{u0['rss_mb']:.0f} MB; after {n1}: {u1['threads']:.0f} threads, "
            f"{u1['fds']:.0f} fds, {u1['rss_mb']:.0f} MB"
        )
    stats = bench.sim.stats()
    ids = {jid for jid, _ in jobs}
    spans = job_spans(stats, ids)
    want = generations_per_job(bench)
    with bench.client() as client:
        states = final_states(client, [fid for _, fid in jobs])
    not_completed = sum(1 for _, fid in jobs if states.get(fid) != "COMPLETED")
    lost = sum(1 for jid in ids if jid not in spans)
    twice = sum(1 for s in spans.values() if s.generations > want)
    intervals = sorted(iv for s in spans.values() for iv in s.intervals)
    overlaps = sum(1 for (_, end), (start, _) in itertools.pairwise(intervals) if start < end)
    ordered = sorted(spans.values(), key=lambda s: s.first_start)
    gaps = [b.first_start - a.last_finish for a, b in itertools.pairwise(ordered)]
    drain = ordered[-1].last_finish - ordered[0].first_start if ordered else 0.0
    bench.record("drain_lost", "ours", lost + not_completed)
    bench.record("drain_twice", "ours", twice)
    bench.record("drain_maxconc", "ours", stats["max_concurrent"])
    bench.record("drain_overlaps", "ours", overlaps)
    bench.record("drain_gap", "ours", median(gaps))
    bench.record("drain_rate", "ours", len(ordered) / drain if drain else None)
    bench.log(
        f"  drain: {len(spans)}/{len(jobs)} generated, not Completed {not_completed}, "
        f"twice {twice}, max_concurrent {stats['max_concurrent']}, overlaps {overlaps}, "
        f"median gap {median(gaps) or 0:.3f}s, {drain:.1f}s"
    )


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

# key, section, label, unit, aggregate over runs ("median" | "sum" | "max"), lower is better
ROWS: list[tuple[str, str, str, str, str]] = [
    ("gap_median", "gap", "GPU idle gap between queued jobs, median", "s", "median"),
    ("gap_p90", "gap", "GPU idle gap, p90", "s", "median"),
    ("gap_max", "gap", "GPU idle gap, max", "s", "max"),
    ("gap_drain", "gap", "drain time, first start -> last finish", "s", "median"),
    ("gap_busy", "gap", "WebUI busy fraction during the drain", "", "median"),
    ("gap_first", "gap", "worker start -> first job at the WebUI", "s", "median"),
    ("submit_median", "submit", "submit -> start (idle worker), median", "s", "median"),
    ("submit_p90", "submit", "submit -> start, p90", "s", "median"),
    ("submit_call", "submit", "submit_queued call itself, median", "s", "median"),
    ("direct_median", "direct", "direct-mode overhead vs no Prefect, median", "s", "median"),
    ("direct_p90", "direct", "direct-mode overhead, p90", "s", "median"),
    ("direct_gt1", "direct", "direct calls > 1 s (of --calls)", "", "median"),
    ("direct_wall", "direct", "direct call wall time, median", "s", "median"),
    ("direct_base", "direct", "same pipeline code without Prefect, median", "s", "median"),
    ("stall_gt1", "stall", "direct calls > 1 s (of --stall-calls)", "", "median"),
    ("stall_wall", "stall", "direct call wall time, median", "s", "median"),
    ("stall_p90", "stall", "direct call wall time, p90", "s", "median"),
    ("stall_max", "stall", "direct call wall time, max", "s", "max"),
    ("stall_missing", "stall", "task runs not recorded after settle", "", "sum"),
    ("stall_failed", "stall", "direct calls not Completed", "", "sum"),
    ("drain_lost", "drain", "jobs lost (not generated or not Completed)", "", "sum"),
    ("drain_twice", "drain", "jobs run more than once", "", "sum"),
    ("drain_maxconc", "drain", "WebUI max concurrent generations", "", "max"),
    ("drain_overlaps", "drain", "overlapping generation intervals", "", "sum"),
    ("drain_gap", "drain", "GPU idle gap, median", "s", "median"),
    ("drain_threads", "drain", "worker threads added per 100 jobs", "", "median"),
    ("drain_fds", "drain", "worker open fds added per 100 jobs", "", "median"),
    ("drain_rss", "drain", "worker RSS added per 100 jobs (MB)", "", "median"),
    ("drain_rate", "drain", "throughput", "jobs/s", "median"),
]


def aggregate(values: list[float], how: str) -> float | None:
    if not values:
        return None
    if how == "sum":
        return sum(values)
    if how == "max":
        return max(values)
    return median(values)


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "jobs/s":
        return f"{value:.2f}/s"
    if float(value).is_integer():
        return f"{int(value)}"
    return f"{value:.2f}"


def ratio(ours: float | None, stock: float | None) -> str:
    if ours is None or stock is None:
        return "-"
    if stock == 0:
        return "-" if ours == 0 else "inf"
    return f"{ours / stock:.2f}x"


def table_rows(bench: Bench, sections: Sequence[str]) -> list[list[str]]:
    rows = []
    runs = bench.args.runs
    for key, section, label, unit, how in ROWS:
        if section not in sections or key not in bench.results:
            continue
        ours = bench.results[key].get("ours", [])
        stock = bench.results[key].get("stock", [])
        a, b = aggregate(ours, how), aggregate(stock, how)
        per_run = ""
        if runs > 1:
            per_run = "; ".join(
                f"{who}: " + ", ".join(fmt(v, unit).replace(" s", "") for v in vals)
                for who, vals in (("ours", ours), ("stock", stock))
                if vals
            )
        rows.append([section, label, fmt(a, unit), fmt(b, unit), ratio(a, b), per_run])
    return rows


def phase_rows(bench: Bench) -> list[list[str]]:
    rows = []
    for name, by in bench.phases.items():
        a = median(by.get("ours", []))
        b = median(by.get("stock", []))
        rows.append([name, fmt(a, "s"), fmt(b, "s")])
    return rows


def print_report(bench: Bench, sections: Sequence[str], header: str) -> str:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)
    agg = "median of the per-run values" if bench.args.runs > 1 else "one run"
    table = Table(title=f"stablenew vs stock Prefect ({agg})")
    columns = ["section", "metric", "stablenew", "stock Prefect", "ours / stock"]
    if bench.args.runs > 1:
        columns.append("per run")
    for column in columns:
        table.add_column(column, justify="right" if column not in ("section", "metric") else "left")
    rows = table_rows(bench, sections)
    for row in rows:
        table.add_row(*row[: len(columns)])
    console.print(table)
    phases = phase_rows(bench)
    if phases:
        ptable = Table(title="where the time goes (medians; from flow-run state timestamps)")
        for column in ("phase", "stablenew", "stock Prefect"):
            ptable.add_column(column, justify="left" if column == "phase" else "right")
        for row in phases:
            ptable.add_row(*row)
        console.print(ptable)
    for note in bench.notes:
        console.print(f"note: {note}", highlight=False)

    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[: len(columns)]) + " |" for row in rows]
    if phases:
        lines += ["", "| phase | stablenew | stock Prefect |", "|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in phases]
    if bench.notes:
        lines += [""] + [f"- {note}" for note in bench.notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The stock direct child: a plain @flow with one @task, no stablenew_core.runner
# ---------------------------------------------------------------------------------------------


def child_stock_direct(args: argparse.Namespace) -> None:
    """Runs in a child process started by ``stock_direct_calls``; writes JSON to --child-out."""
    import prefect.flow_engine
    from prefect import flow, task

    from stablenew_core.config import redact
    from stablenew_core.jobs import Job
    from stablenew_core.settings import Settings
    from stablenew_core.webui.client import WebUIClient

    # The flow's parameter model resolves annotations in this module's globals (the file uses
    # ``from __future__ import annotations``), so ``Job`` must be visible there.
    globals()["Job"] = Job
    settings = Settings()
    bench = Bench(args=args, tmp=Path(tempfile.gettempdir()), token="", procs=Processes())
    client = WebUIClient.from_settings(settings)

    @task(name="job")
    def stock_job(job: Job) -> None:
        run_baseline(client, settings, job)

    @flow(name="bench-stock-direct", validate_parameters=True)
    def stock_pipeline(job: Job) -> None:
        stock_job(job)

    def new_job(prompt: str) -> Job:
        config = bench.config(prompt)
        return Job(
            config=config,
            run_mode="direct",
            source="run",
            prompt_source="manual",
            config_snapshot=redact(config.to_dict()),
        )

    baseline: list[float] = []
    walls: list[float] = []
    flow_run_ids: list[str] = []
    failed = 0
    warmup = 1
    for number in range(warmup + args.calls):
        t0 = time.perf_counter()
        run_baseline(client, settings, new_job(f"stock baseline {number}"))
        t1 = time.perf_counter()
        state = stock_pipeline(new_job(f"stock direct {number}"), return_state=True)
        t2 = time.perf_counter()
        if number < warmup:
            continue
        baseline.append(t1 - t0)
        walls.append(t2 - t1)
        flow_run_ids.append(str(state.state_details.flow_run_id))
        if not state.is_completed():
            failed += 1
    client.close()
    heartbeats = prefect.flow_engine._send_heartbeats
    isolation = {
        "runner_imported": "stablenew_core.runner" in sys.modules,
        "patched": hasattr(heartbeats, "__wrapped_original__"),
        "stablenew_modules": sorted(m for m in sys.modules if m.startswith("stablenew_core")),
    }
    Path(args.child_out).write_text(
        json.dumps(
            {
                "baseline": baseline,
                "flow": walls,
                "flow_run_ids": flow_run_ids,
                "failed": failed,
                "isolation": isolation,
            }
        )
    )


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help="comma list of " + ",".join(SECTIONS)
    )
    parser.add_argument("--jobs", type=int, default=30, help="queued jobs for the gap section")
    parser.add_argument("--submits", type=int, default=10, help="jobs for submit -> start")
    parser.add_argument("--calls", type=int, default=50, help="direct calls (direct section)")
    parser.add_argument("--stall-calls", type=int, default=200, help="direct calls (stall)")
    parser.add_argument("--drain-jobs", type=int, default=200, help="queued jobs (drain)")
    parser.add_argument("--runs", type=int, default=1, help="repeat every section; median")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per job")
    parser.add_argument(
        "--step-seconds", type=float, default=0.05, help="simulated seconds per step (gap, submit)"
    )
    parser.add_argument(
        "--drain-step-seconds", type=float, default=0.01, help="seconds per step (drain)"
    )
    parser.add_argument("--size", type=int, default=512, help="image width and height")
    parser.add_argument(
        "--stages", default="txt2img", help="txt2img[,img2img,adetailer,upscale] (planned stages)"
    )
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before task-run count")
    parser.add_argument(
        "--no-stall-stock",
        dest="stall_stock",
        action="store_false",
        help="skip the stock flow in the stall section",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="postgresql+asyncpg://... for the bench's server (default: SQLite in a temp home)",
    )
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    parser.add_argument("--json", type=Path, default=None, help="write the raw per-run values")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    parser.add_argument("--child-stock-direct", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{socket.gethostname()}, {os.cpu_count()} cores ({cpu}), load avg {load}"


def source_tree() -> str:
    """Where the library is imported from: its checkout's commit and how many tracked files
    differ from it (the library can change while a long run goes on: workers started later
    import the newer code)."""
    import stablenew_core

    repo = Path(stablenew_core.__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return f"{repo} (not a git checkout)"
    state = f"{len(dirty)} tracked files modified" if dirty else "clean"
    return f"{head[:90]} ({state})"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_stock_direct:
        child_stock_direct(args)
        return 0
    sections = [s for s in SECTIONS if s in args.only.split(",")]
    for key in list(os.environ):
        if key.startswith("STABLENEW_") or key in ("PREFECT_API_URL", "PREFECT_API_KEY"):
            del os.environ[key]
    # Prefect's console log lines (INFO per flow and task run) off in this process and the
    # children; logs still go to the API as usual.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
    token = uuid.uuid4().hex
    os.environ[TOKEN_VAR] = token  # inherited by the server, the simulator and every child
    tmp = Path(tempfile.mkdtemp(prefix="stablenew-bench-"))
    procs = Processes()
    bench = Bench(args=args, tmp=tmp, token=token, procs=procs)
    bench.log = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)
    # Ctrl-C, kill and hang-up all end in the cleanup below (even when started in the
    # background, where a shell leaves SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    started = datetime.now(UTC)
    machine_before = machine()
    tree = source_tree()
    code = 0
    try:
        from stablenew_core.server import LocalServer
        from stablenew_core.settings import Settings
        from stablenew_core.webui.process import SimulatorProcess, free_port

        bench.settings = Settings(
            home=tmp / "home",
            output_dir=tmp / "outputs",
            server_port=free_port(),
            server_start_timeout=240,
            database_url=args.database_url,
        )
        # The bench's own client calls go to its own server, with its own PREFECT_HOME.
        from stablenew_core.prefect_env import process_env

        os.environ.update(
            {
                k: v
                for k, v in process_env(bench.settings).items()
                if k.startswith("PREFECT_") or k == "DO_NOT_TRACK"
            }
        )
        bench.log(f"temp dir {tmp}; starting the Prefect server on {bench.settings.local_api_url}")
        t0 = time.monotonic()
        bench.server = LocalServer(bench.settings)
        bench.server.start(detach=True)
        bench.log(f"server healthy after {time.monotonic() - t0:.1f}s; starting the simulator")
        bench.sim = SimulatorProcess(
            step_seconds=args.step_seconds, log_path=tmp / "logs" / "simulator.log"
        )
        (tmp / "logs").mkdir(parents=True, exist_ok=True)
        bench.sim.start()
        bench.settings = bench.settings.model_copy(update={"webui_url": bench.sim.url})
        backend = "PostgreSQL" if args.database_url else "SQLite"
        bench.notes.append(
            f"backend {backend}; simulator step_seconds {args.step_seconds} x {args.steps} steps "
            f"(gap, submit), 0 (direct, stall), {args.drain_step_seconds} (drain); "
            f"stages {args.stages}; {args.size}x{args.size}; runs {args.runs}"
        )
        section_fns = {
            "gap": section_gap,
            "submit": section_submit,
            "direct": section_direct,
            "stall": section_stall,
            "drain": section_drain,
        }
        for run in range(1, args.runs + 1):
            for section in sections:
                bench.log(f"run {run}/{args.runs}: {section}")
                section_fns[section](bench, run)
    except KeyboardInterrupt:
        bench.log("interrupted; stopping everything this script started")
        code = 130
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            procs.stop_all()
            if bench.sim is not None:
                bench.sim.stop()
            if bench.server is not None:
                bench.server.stop()
            _reap_all()
            stragglers = processes_with_token(token)
            if stragglers:
                bench.log(f"killing {len(stragglers)} leftover process(es): {stragglers}")
                _kill(stragglers, signal.SIGKILL)
                time.sleep(0.5)
                _reap_all()
            left = processes_with_token(token)
            bench.log("nothing left running" if not left else f"STILL RUNNING: {left}")
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                bench.log(f"kept {tmp}")
        finally:
            signal.signal(signal.SIGINT, previous)

    if bench.results:
        command = "python bench/queue_bench.py " + " ".join(
            sys.argv[1:] if argv is None else list(argv)
        )
        header = (
            f"{started:%Y-%m-%d %H:%M} UTC; {machine_before}; "
            f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n\n"
            f"library at {tree}\n\n"
            f"`{command.strip()}`"
        )
        markdown = print_report(bench, sections, header)
        if args.markdown is not None:
            args.markdown.write_text(markdown)
        if args.json is not None:
            args.json.write_text(
                json.dumps(
                    {"results": bench.results, "phases": bench.phases, "notes": bench.notes},
                    indent=1,
                )
            )
    return code


if __name__ == "__main__":
    sys.exit(main())
