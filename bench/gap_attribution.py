"""Where the queue worker's per-job time goes: an A/B of two Prefect costs, by switching each off.

A diagnostic beside ``bench/queue_bench.py``, not a test and not a fix: every variant runs the
library unchanged, in a child process of its own, and switches a cost off there only by
monkeypatching (nothing in the repository is edited):

``A``   as is;
``S``   Prefect's flow-run suspension observer skipped (``prefect.flow_engine.
        observe_flow_run_suspension`` -> no-op). Prefect enters it for every deployment run: a
        thread running ``asyncio.run`` with a websocket subscription, polled every 0.2 s and
        joined when the run ends;
``T``   the per-job tag ``job:<id>`` kept off the task runs (``Job.tags`` without it). Prefect
        acquires tag concurrency slots for every tagged task through a service keyed by the
        task's exact tag set, one instance per distinct set, each with its own thread and
        client, kept for the life of the process;
``ST``  both.

Each child serves ``--jobs`` queued jobs with ``SingleNodeJobRunner.run_forever`` (the code
``stablenew worker`` runs) against one Prefect server and one simulator (step time 0) started
by the parent, and reports the median time per job (between ``on_job`` callbacks) and how many
threads, file descriptors and MB of RSS the process gained. Usage::

    .venv/bin/python bench/gap_attribution.py --jobs 40 --repeat 2
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")

MODES = ("A", "S", "T", "ST")


def _usage() -> tuple[int, int, float]:
    status = Path("/proc/self/status").read_text().splitlines()
    rss = next(line for line in status if line.startswith("VmRSS")).split()[1]
    return threading.active_count(), len(os.listdir("/proc/self/fd")), int(rss) / 1024


def child(mode: str, jobs: int, out: Path) -> None:
    """One variant: deploy a pool, queue ``jobs + 2`` jobs, serve them in this process."""
    from stablenew_core.config import PipelineConfig
    from stablenew_core.controller import PipelineController
    from stablenew_core.runner import SingleNodeJobRunner
    from stablenew_core.service import JobService
    from stablenew_core.settings import Settings

    if "S" in mode:
        import prefect.flow_engine as flow_engine

        @contextlib.contextmanager
        def no_observer(*args: Any, **kwargs: Any) -> Iterator[None]:
            yield

        flow_engine.observe_flow_run_suspension = no_observer  # type: ignore[assignment]
    if "T" in mode:
        from stablenew_core.jobs import Job

        original = Job.tags

        def without_job_tag(self: Job) -> list[str]:
            return [tag for tag in original(self) if not tag.startswith("job:")]

        Job.tags = without_job_tag  # type: ignore[method-assign]

    settings = Settings()
    service = JobService(settings, start_server=False)
    service.deploy()
    controller = PipelineController(service)
    for number in range(jobs + 2):
        job = controller.build_job(
            PipelineConfig(prompt=f"attribution {number}", seed=1),
            run_mode="queue",
            source="add_to_queue",
            prompt_source="manual",
        )
        service.submit_queued(job)
    runner = SingleNodeJobRunner(settings)
    runner.run_forever(max_jobs=2)  # warm up
    before = _usage()
    stamps: list[float] = []
    started = time.perf_counter()
    runner.run_forever(max_jobs=jobs, on_job=lambda record: stamps.append(time.perf_counter()))
    elapsed = time.perf_counter() - started
    after = _usage()
    per_job = [b - a for a, b in itertools.pairwise(stamps)]
    out.write_text(
        json.dumps(
            {
                "mode": mode,
                "jobs": jobs,
                "elapsed": elapsed,
                "per_job_median": statistics.median(per_job),
                "threads": after[0] - before[0],
                "fds": after[1] - before[1],
                "rss_mb": after[2] - before[2],
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of A, S, T, ST")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.jobs, Path(args.out))
        return 0

    from stablenew_core.prefect_env import process_env
    from stablenew_core.server import LocalServer
    from stablenew_core.settings import Settings, settings_env
    from stablenew_core.webui.process import SimulatorProcess, free_port

    for key in list(os.environ):
        if key.startswith("STABLENEW_") or key in ("PREFECT_API_URL", "PREFECT_API_KEY"):
            del os.environ[key]
    tmp = Path(tempfile.mkdtemp(prefix="stablenew-attribution-"))
    settings = Settings(
        home=tmp / "home",
        output_dir=tmp / "outputs",
        server_port=free_port(),
        server_start_timeout=240,
    )
    server = LocalServer(settings)
    sim = SimulatorProcess(step_seconds=0)
    results: list[dict[str, Any]] = []
    current: subprocess.Popen[bytes] | None = None
    try:
        server.start(detach=True)
        sim.start()
        settings = settings.model_copy(update={"webui_url": sim.url})
        for _ in range(args.repeat):
            for mode in args.modes.split(","):
                pool = f"attr-{mode.lower()}-{uuid.uuid4().hex[:8]}"
                variant = settings.model_copy(update={"work_pool": pool, "deployment_name": pool})
                env = process_env(variant)
                env.update(settings_env(variant))
                out = tmp / f"{pool}.json"
                current = subprocess.Popen(
                    [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--child",
                        mode,
                        "--jobs",
                        str(args.jobs),
                        "--out",
                        str(out),
                    ],
                    env=env,
                )
                current.wait()
                current = None
                if out.exists():
                    result = json.loads(out.read_text())
                    results.append(result)
                    print(
                        f"{mode:>2}: {result['jobs']} jobs in {result['elapsed']:.1f}s, "
                        f"{result['per_job_median']:.3f}s per job (median); "
                        f"+{result['threads']} threads, +{result['fds']} fds, "
                        f"+{result['rss_mb']:.0f} MB RSS",
                        flush=True,
                    )
                else:
                    print(f"{mode:>2}: the child failed (code see above)", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        if current is not None and current.poll() is None:
            current.kill()
            current.wait()
        sim.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if results:
        print("\nmedian over rounds:")
        for mode in args.modes.split(","):
            rows = [r for r in results if r["mode"] == mode]
            if rows:
                print(
                    f"{mode:>2}: {statistics.median(r['per_job_median'] for r in rows):.3f}s/job, "
                    f"+{statistics.median(r['threads'] for r in rows):.0f} threads, "
                    f"+{statistics.median(r['rss_mb'] for r in rows):.0f} MB "
                    f"per {args.jobs} jobs"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
