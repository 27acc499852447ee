"""The ``stablenew`` command line: typer + rich over the public API.

Every command reads :class:`Settings` from the environment (``STABLENEW_*``) and lets options
override them. Errors of the library become one red line and exit code 2 (bad input) or 1
(anything else): never a traceback for a user's mistake.
"""

from __future__ import annotations

import json
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from .config import PipelineConfig
from .errors import ConfigError, PackError, StablenewError
from .jobs import JOB_SOURCES, JOB_STATUSES, RUN_MODES, JobRecord
from .prefect_env import configure_process, disable_telemetry
from .settings import Settings, get_settings

app = typer.Typer(
    name="stablenew",
    help="Run Stable Diffusion WebUI pipelines now or through a queue, on Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
pack_app = typer.Typer(help="Prompt packs: many jobs from one file.", no_args_is_help=True)
app.add_typer(pack_app, name="pack")

console = Console()
err = Console(stderr=True)
T = TypeVar("T")

HomeOpt = Annotated[
    Path | None, typer.Option("--home", help="Data directory [env STABLENEW_HOME].")
]
WebUIOpt = Annotated[
    str | None, typer.Option("--webui", help="WebUI base URL [env STABLENEW_WEBUI_URL].")
]
OutputOpt = Annotated[
    Path | None, typer.Option("--output-dir", help="Image root [env STABLENEW_OUTPUT_DIR].")
]


def _settings(**overrides: Any) -> Settings:
    try:
        settings = get_settings(**overrides)
    except ValidationError as exc:  # never echo a setting's value: it may be a secret
        raise ConfigError(_validation_message(exc, "setting", show_input=False)) from exc
    # Before Prefect is imported: its process-wide settings (used by its background threads)
    # must point at the same server as ours.
    configure_process(settings)
    return settings


def _validation_message(exc: ValidationError, what: str, *, show_input: bool = True) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or what
        got = f" (got {error['input']!r})" if show_input and "input" in error else ""
        parts.append(f"{where}: {error['msg']}{got}")
    return f"invalid {what}: " + "; ".join(parts)


@contextmanager
def _friendly_errors() -> Iterator[None]:
    try:
        yield
    except (ConfigError, PackError) as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    except ValidationError as exc:
        err.print(f"[red]error:[/red] {_validation_message(exc, 'option')}", highlight=False)
        raise typer.Exit(2) from None
    except StablenewError as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None


def _guarded(fn: Callable[[], T]) -> T:
    with _friendly_errors():
        return fn()


# -- config options -------------------------------------------------------------------------


def build_config(
    prompt: str,
    *,
    config_file: Path | None = None,
    **fields: Any,
) -> PipelineConfig:
    """A PipelineConfig from a JSON file (optional) and the options given (not None)."""
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {config_file} must hold a JSON object")
    data["prompt"] = prompt
    for section in ("img2img", "adetailer", "upscale", "hires"):
        if fields.pop(section, None):
            data.setdefault(section, {})["enabled"] = True
    data.update({key: value for key, value in fields.items() if value is not None})
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, "config")) from exc


def _config_options(
    prompt: str,
    negative: str | None,
    steps: int | None,
    width: int | None,
    height: int | None,
    seed: int | None,
    sampler: str | None,
    model: str | None,
    cfg: float | None,
    batch_size: int | None,
    n_iter: int | None,
    img2img: bool,
    adetailer: bool,
    upscale: bool,
    hires: bool,
    config_file: Path | None,
) -> PipelineConfig:
    return build_config(
        prompt,
        config_file=config_file,
        negative_prompt=negative,
        steps=steps,
        width=width,
        height=height,
        seed=seed,
        sampler_name=sampler,
        model=model,
        cfg_scale=cfg,
        batch_size=batch_size,
        n_iter=n_iter,
        img2img=img2img,
        adetailer=adetailer,
        upscale=upscale,
        hires=hires,
    )


NegOpt = Annotated[str | None, typer.Option("--negative", "-n", help="Negative prompt.")]
StepsOpt = Annotated[int | None, typer.Option(help="Sampling steps.")]
WidthOpt = Annotated[int | None, typer.Option(help="Width (multiple of 8).")]
HeightOpt = Annotated[int | None, typer.Option(help="Height (multiple of 8).")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed; -1 = random.")]
SamplerOpt = Annotated[str | None, typer.Option(help="Sampler name.")]
ModelOpt = Annotated[str | None, typer.Option(help="Checkpoint, pinned per request.")]
CfgOpt = Annotated[float | None, typer.Option("--cfg", help="CFG scale.")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Images per batch.")]
IterOpt = Annotated[int | None, typer.Option("--n-iter", help="Batches.")]
Img2ImgOpt = Annotated[bool, typer.Option("--img2img", help="Add an img2img pass.")]
ADetailerOpt = Annotated[bool, typer.Option("--adetailer", help="Add an ADetailer pass.")]
UpscaleOpt = Annotated[bool, typer.Option("--upscale", help="Upscale at the end.")]
HiresOpt = Annotated[bool, typer.Option("--hires", help="txt2img high-res fix.")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="JSON file of PipelineConfig fields.")
]
PriorityOpt = Annotated[str, typer.Option(help="Queue priority: high, normal or low.")]


def _print_record(record: JobRecord) -> None:
    colour = {"completed": "green", "failed": "red", "crashed": "red", "cancelled": "yellow"}
    status = record.status
    console.print(f"job      {record.job_id}", highlight=False)
    console.print(
        f"status   [{colour.get(status, 'cyan')}]{status}[/]", highlight=False, markup=True
    )
    console.print(f"mode     {record.run_mode} (source {record.source})", highlight=False)
    if record.flow_run_id:
        console.print(f"run      {record.flow_run_id}", highlight=False)
    if record.error:
        console.print(f"error    {record.error}", highlight=False, markup=False, soft_wrap=True)
    for path in record.outputs:
        console.print(f"image    {path}", highlight=False, markup=False, soft_wrap=True)


def _controller(settings: Settings) -> Any:
    from .controller import PipelineController

    return PipelineController(settings=settings)


# -- commands -------------------------------------------------------------------------------


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    negative: NegOpt = None,
    steps: StepsOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    seed: SeedOpt = None,
    sampler: SamplerOpt = None,
    model: ModelOpt = None,
    cfg: CfgOpt = None,
    batch_size: BatchOpt = None,
    n_iter: IterOpt = None,
    img2img: Img2ImgOpt = False,
    adetailer: ADetailerOpt = False,
    upscale: UpscaleOpt = False,
    hires: HiresOpt = False,
    config: ConfigOpt = None,
    webui: WebUIOpt = None,
    home: HomeOpt = None,
    output_dir: OutputOpt = None,
) -> None:
    """Run a pipeline now (direct mode) and wait for its images."""

    def go() -> None:
        settings = _settings(home=home, webui_url=webui, output_dir=output_dir)
        job_config = _config_options(
            prompt, negative, steps, width, height, seed, sampler, model, cfg,
            batch_size, n_iter, img2img, adetailer, upscale, hires, config,
        )  # fmt: skip
        record = _run_direct_with_progress(settings, job_config)
        _print_record(record)
        if record.status != "completed":
            raise typer.Exit(1)

    _guarded(go)


def _run_direct_with_progress(settings: Settings, job_config: PipelineConfig) -> JobRecord:
    """Run one direct job with a progress bar fed by the WebUI's per-task progress."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    from .runtime import RunControl, use_control

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("waiting for the GPU / WebUI", total=1.0)

        def report(stage: str, fraction: float, text: str) -> None:
            bar.update(task, completed=fraction, description=text or stage)

        with use_control(RunControl(progress=report)):
            (record,) = _controller(settings).run(job_config, run_mode="direct")
    return record


@app.command()
def queue(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    negative: NegOpt = None,
    steps: StepsOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    seed: SeedOpt = None,
    sampler: SamplerOpt = None,
    model: ModelOpt = None,
    cfg: CfgOpt = None,
    batch_size: BatchOpt = None,
    n_iter: IterOpt = None,
    img2img: Img2ImgOpt = False,
    adetailer: ADetailerOpt = False,
    upscale: UpscaleOpt = False,
    hires: HiresOpt = False,
    config: ConfigOpt = None,
    priority: PriorityOpt = "normal",
    key: Annotated[
        str | None, typer.Option(help="Idempotency key: the same key submits once.")
    ] = None,
    worker: Annotated[
        str | None, typer.Option("--worker", help="Run only on this named worker.")
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Add a pipeline to the queue; a worker runs it. Prints the job id."""

    def go() -> None:
        settings = _settings(home=home)
        job_config = _config_options(
            prompt, negative, steps, width, height, seed, sampler, model, cfg,
            batch_size, n_iter, img2img, adetailer, upscale, hires, config,
        )  # fmt: skip
        controller = _controller(settings)
        job = controller.build_job(
            job_config,
            run_mode="queue",
            source="add_to_queue",
            prompt_source="manual",
            priority=_priority(priority),
            idempotency_key=key,
            worker=worker,
        )
        (record,) = controller.submit([job])
        console.print(record.job_id, highlight=False)

    _guarded(go)


def _priority(value: str) -> Any:
    from .jobs import PRIORITIES

    lowered = value.strip().lower()
    if lowered not in PRIORITIES:
        raise ConfigError(f"--priority: expected one of {', '.join(PRIORITIES)}, got {value!r}")
    return lowered


def _choice(option: str, value: str | None, allowed: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered not in allowed:
        raise ConfigError(f"{option}: expected one of {', '.join(allowed)}, got {value!r}")
    return lowered


@app.command()
def history(
    mode: Annotated[str | None, typer.Option("--mode", help="direct or queue.")] = None,
    source: Annotated[str | None, typer.Option(help="run, run_now, add_to_queue, ...")] = None,
    status: Annotated[str | None, typer.Option(help="queued, running, completed, ...")] = None,
    pack: Annotated[str | None, typer.Option(help="Pack id.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100000)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    home: HomeOpt = None,
) -> None:
    """Show recorded jobs, newest first."""

    def go() -> None:
        from .history import JobHistoryStore
        from .server import ensure_server

        filters = {
            "run_mode": _choice("--mode", mode, RUN_MODES),
            "source": _choice("--source", source, JOB_SOURCES),
            "status": _choice("--status", status, JOB_STATUSES),
            "prompt_pack_id": pack,
        }
        settings = _settings(home=home)
        ensure_server(settings)
        records = JobHistoryStore(settings).list(**filters, limit=limit, offset=offset)
        if as_json:
            for record in records:
                console.print_json(record.model_dump_json())
            return
        table = Table(title=f"stablenew history ({len(records)} shown)")
        for column in ("job", "status", "mode", "source", "created", "images", "pack"):
            table.add_column(column, no_wrap=True)
        table.add_column("prompt", overflow="ellipsis", no_wrap=True, max_width=18)
        for r in records:
            table.add_row(
                r.job_id[:12],
                r.status,
                r.run_mode,
                r.source,
                r.created_at.strftime("%m-%d %H:%M:%S") if r.created_at else "",
                str(len(r.outputs)),
                r.prompt_pack_id or "",
                str((r.config_snapshot or {}).get("prompt", "")),
            )
        console.print(table)

    _guarded(go)


@app.command()
def show(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    home: HomeOpt = None,
) -> None:
    """Show one job's record."""

    def go() -> None:
        from .history import JobHistoryStore
        from .server import ensure_server

        settings = _settings(home=home)
        ensure_server(settings)
        _print_record(JobHistoryStore(settings).get(job_id))

    _guarded(go)


def _service(home: Path | None) -> Any:
    from .service import JobService

    return JobService(_settings(home=home))


@app.command()
def pause(home: HomeOpt = None) -> None:
    """Pause the queue: the running job finishes, nothing new starts."""
    _guarded(lambda: _service(home).pause())
    console.print("queue paused")


@app.command()
def resume(home: HomeOpt = None) -> None:
    """Resume the queue."""
    _guarded(lambda: _service(home).resume())
    console.print("queue resumed")


@app.command()
def status(home: HomeOpt = None) -> None:
    """The queue at a glance: paused?, running job, queued count, workers."""

    def go() -> None:
        st = _service(home).status()
        console.print(f"paused   {'yes' if st.paused else 'no'}")
        console.print(f"queued   {st.queued}")
        for record in st.running:
            console.print(f"running  {record.job_id}", highlight=False)
        if not st.running:
            console.print("running  -")
        for w in st.workers:
            beat = w.last_heartbeat.strftime("%H:%M:%S") if w.last_heartbeat else "never"
            console.print(f"worker   {w.name} {w.status} (last heartbeat {beat})", highlight=False)

    _guarded(go)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="Job id.")], home: HomeOpt = None) -> None:
    """Cancel a queued job (it never starts) or a running one (stopped at a safe point)."""

    def go() -> None:
        record = _service(home).cancel(job_id)
        console.print(f"{record.job_id} {record.status}", highlight=False)

    _guarded(go)


@app.command()
def front(job_id: Annotated[str, typer.Argument(help="Job id.")], home: HomeOpt = None) -> None:
    """Move a queued job to the front of its priority."""

    def go() -> None:
        record = _service(home).move_to_front(job_id)
        console.print(f"{record.job_id} moved to the front", highlight=False)

    _guarded(go)


@app.command()
def retry(
    job_id: Annotated[str, typer.Argument(help="A failed, crashed or cancelled job.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config edit FIELD=VALUE (JSON value), e.g. width=512."),
    ] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="direct or queue.")] = None,
    home: HomeOpt = None,
) -> None:
    """Submit a job again as a new job that names the one it retries."""

    def go() -> None:
        edits = parse_edits(set_ or [])
        record = _service(home).retry(
            job_id, edits=edits, run_mode=_choice("--mode", mode, RUN_MODES)
        )
        _print_record(record)

    _guarded(go)


def parse_edits(items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs (dotted fields reach into sections; values read as JSON if they
    parse, else as text) as a nested dict of config edits."""
    edits: dict[str, Any] = {}
    for item in items:
        field, sep, raw = item.partition("=")
        if not sep or not field.strip():
            raise ConfigError(f"--set: expected FIELD=VALUE, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        target = edits
        *sections, leaf = field.strip().split(".")
        for section in sections:
            target = target.setdefault(section, {})
        target[leaf] = value
    return edits


def parse_duration(text: str) -> Any:
    """``90d``, ``12h``, ``30m``, ``45s`` or ``2w`` as a timedelta."""
    from datetime import timedelta

    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    value, unit = text.strip()[:-1], text.strip()[-1:].lower()
    try:
        amount = float(value)
    except ValueError:
        amount = -1
    if unit not in units or amount < 0:
        raise ConfigError(f"--older-than: expected a duration like 90d, 12h or 30m, got {text!r}")
    return timedelta(**{units[unit]: amount})


@app.command()
def prune(
    older_than: Annotated[str, typer.Option("--older-than", help="e.g. 90d, 12h.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count.")] = False,
    home: HomeOpt = None,
    output_dir: OutputOpt = None,
) -> None:
    """Delete ended jobs older than a duration: their records and their images."""

    def go() -> None:
        from .service import JobService

        age = parse_duration(older_than)
        service = JobService(_settings(home=home, output_dir=output_dir))
        report = service.prune(age, dry_run=dry_run)
        verb = "would delete" if dry_run else "deleted"
        console.print(
            f"{verb} {report.jobs} jobs and {report.folders} image folders "
            f"older than {report.cutoff:%Y-%m-%d %H:%M} UTC"
        )

    _guarded(go)


@app.command()
def deploy(
    gpus: Annotated[
        int | None, typer.Option(min=1, help="GPUs in the pool (its concurrency limit).")
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Create or update the work pool and the deployment (idempotent)."""

    def go() -> None:
        from .service import JobService

        ref = JobService(_settings(home=home)).deploy(gpus=gpus)
        console.print(f"deployment {ref.name} ({ref.deployment_id}) on work pool {ref.work_pool}")

    _guarded(go)


@app.command()
def worker(
    webui: WebUIOpt = None,
    name: Annotated[str | None, typer.Option(help="Worker name, e.g. gpu-1.")] = None,
    home: HomeOpt = None,
    output_dir: OutputOpt = None,
) -> None:
    """Serve the queue: run queued jobs one at a time until Ctrl-C."""

    def go() -> None:
        settings = _settings(home=home, webui_url=webui, output_dir=output_dir, worker_name=name)
        _serve_queue(settings)

    _guarded(go)


def _serve_queue(settings: Settings) -> None:
    import time

    import httpx

    from .errors import ServerError
    from .runner import SingleNodeJobRunner
    from .service import JobService

    runner = SingleNodeJobRunner(settings)
    _stop_on_signals(runner.stop)
    # A worker never starts a server: it waits for the one it was pointed at.
    while True:
        try:
            JobService(settings, start_server=False).deploy()
            break
        except (ServerError, httpx.HTTPError) as exc:
            if runner.stopping:
                return
            err.print(f"waiting for the Prefect server: {exc}", markup=False, highlight=False)
            time.sleep(2)
    console.print(
        f"worker {runner.worker_name} serving pool {settings.work_pool} "
        f"(WebUI {settings.webui_url}); Ctrl-C stops",
        highlight=False,
    )
    runner.run_forever(
        on_job=lambda r: console.print(f"{r.job_id} {r.status}", highlight=False, markup=False)
    )


def _stop_on_signals(stop: Callable[[], None]) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        console.print("stopping after the job in progress...")
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


DatabaseOpt = Annotated[
    str | None,
    typer.Option(
        "--database",
        help="postgresql+asyncpg://user:pass@host:5432/db for the server [env "
        "STABLENEW_DATABASE_URL]; default: SQLite under the data directory.",
    ),
]


@app.command()
def up(
    webui: WebUIOpt = None,
    database: DatabaseOpt = None,
    home: HomeOpt = None,
    output_dir: OutputOpt = None,
) -> None:
    """Start the local Prefect server, the pool and deployment, and a worker (Ctrl-C stops all)."""

    def go() -> None:
        from .server import LocalServer

        settings = _settings(
            home=home, webui_url=webui, output_dir=output_dir, database_url=database
        )
        server = LocalServer(settings)
        started = not server.healthy()
        if started:
            with console.status("starting the Prefect server..."):
                server.start(detach=False)
        console.print(f"Prefect UI: {settings.local_api_url.removesuffix('/api')}")
        try:
            _serve_queue(settings)
        finally:
            if started:
                server.stop()

    _guarded(go)


@app.command()
def down(home: HomeOpt = None) -> None:
    """Stop the local Prefect server started by stablenew."""
    from .server import LocalServer

    stopped = LocalServer(_settings(home=home)).stop()
    console.print("server stopped" if stopped else "no server of ours was running")


@app.command("webui-sim")
def webui_sim(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 7860,
    step_seconds: Annotated[float, typer.Option(help="Simulated seconds per step.")] = 0.01,
    auth: Annotated[str | None, typer.Option(help="user:pass for basic auth.")] = None,
    fault: Annotated[
        list[str] | None, typer.Option(help="KIND:COUNT, e.g. 500:2 (repeatable).")
    ] = None,
) -> None:
    """Serve the A1111-compatible WebUI simulator (for demos and tests)."""
    from .webui.simulator import main as simulator_main

    args = ["--host", host, "--port", str(port), "--step-seconds", str(step_seconds)]
    if auth:
        args += ["--auth", auth]
    for item in fault or []:
        args += ["--fault", item]
    simulator_main(args)


# -- packs ----------------------------------------------------------------------------------

PackFileArg = Annotated[Path, typer.Argument(help="A .txt or .json prompt pack.")]
ImagesOpt = Annotated[
    int | None, typer.Option("--images-per-prompt", help="Jobs per prompt and variant.")
]
SeedModeOpt = Annotated[str | None, typer.Option("--seed-mode", help="fixed, increment or random.")]
MaxJobsOpt = Annotated[int, typer.Option("--max-jobs", help="Cap on expanded jobs (<= 8192).")]


def _pack_base(
    steps: int | None, width: int | None, height: int | None, sampler: str | None,
    model: str | None, cfg: float | None,
) -> dict[str, Any]:  # fmt: skip
    fields = {
        "steps": steps,
        "width": width,
        "height": height,
        "sampler_name": sampler,
        "model": model,
        "cfg_scale": cfg,
    }
    return {key: value for key, value in fields.items() if value is not None}


def _expand_options(
    images_per_prompt: int | None, seed_mode: str | None, seed: int | None, max_jobs: int,
    base: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    from .packs import DEFAULT_MAX_JOBS

    return {
        "images_per_prompt": images_per_prompt,
        "seed_mode": _choice("--seed-mode", seed_mode, ("fixed", "increment", "random")),
        "seed": seed,
        "max_jobs": max_jobs or DEFAULT_MAX_JOBS,
        "base": base or None,
    }


@pack_app.command("show")
def pack_show(
    file: PackFileArg,
    images_per_prompt: ImagesOpt = None,
    seed_mode: SeedModeOpt = None,
    seed: SeedOpt = None,
    max_jobs: MaxJobsOpt = 0,
    steps: StepsOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    sampler: SamplerOpt = None,
    model: ModelOpt = None,
    cfg: CfgOpt = None,
) -> None:
    """Show the jobs a pack expands to; nothing is submitted."""

    def go() -> None:
        from .packs import load_and_expand

        base = _pack_base(steps, width, height, sampler, model, cfg)
        entries = load_and_expand(
            file, **_expand_options(images_per_prompt, seed_mode, seed, max_jobs, base)
        )
        table = Table(title=f"{file.name}: {len(entries)} jobs (pack {entries[0].pack_id})")
        for column in ("#", "prompt", "negative", "variant", "seed", "size", "steps"):
            table.add_column(column)
        for e in entries:
            c = e.config
            table.add_row(
                str(e.index),
                c.prompt,
                c.negative_prompt,
                ", ".join(f"{k}={v}" for k, v in e.variant.items()),
                str(c.seed),
                f"{c.width}x{c.height}",
                str(c.steps),
            )
        console.print(table)

    _guarded(go)


def _submit_pack(
    action: str,
    file: Path,
    run_mode: str | None,
    priority: str,
    expand: dict[str, Any],
    settings: Settings,
) -> None:
    controller = _controller(settings)
    if action == "run_now":
        records = controller.run_now(
            file, run_mode=run_mode, priority=_priority(priority), **expand
        )
    else:
        records = controller.add_to_queue(file, priority=_priority(priority), **expand)
    for record in records:
        console.print(
            f"{record.job_id} {record.status} {record.run_mode} " + " ".join(record.outputs),
            highlight=False,
            markup=False,
        )
    if any(r.status in ("failed", "crashed", "cancelled") for r in records):
        raise typer.Exit(1)


@pack_app.command("run-now")
def pack_run_now(
    file: PackFileArg,
    mode: Annotated[
        str | None, typer.Option("--mode", help="direct or queue (default queue).")
    ] = None,
    priority: PriorityOpt = "normal",
    images_per_prompt: ImagesOpt = None,
    seed_mode: SeedModeOpt = None,
    seed: SeedOpt = None,
    max_jobs: MaxJobsOpt = 0,
    steps: StepsOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    sampler: SamplerOpt = None,
    model: ModelOpt = None,
    cfg: CfgOpt = None,
    webui: WebUIOpt = None,
    home: HomeOpt = None,
    output_dir: OutputOpt = None,
) -> None:
    """Run Now: every job of the pack, in the run mode given (direct waits for each)."""

    def go() -> None:
        settings = _settings(home=home, webui_url=webui, output_dir=output_dir)
        base = _pack_base(steps, width, height, sampler, model, cfg)
        expand = _expand_options(images_per_prompt, seed_mode, seed, max_jobs, base)
        run_mode = _choice("--mode", mode, RUN_MODES) if mode is not None else None
        _submit_pack("run_now", file, run_mode, priority, expand, settings)

    _guarded(go)


@pack_app.command("queue")
def pack_queue(
    file: PackFileArg,
    priority: PriorityOpt = "normal",
    images_per_prompt: ImagesOpt = None,
    seed_mode: SeedModeOpt = None,
    seed: SeedOpt = None,
    max_jobs: MaxJobsOpt = 0,
    steps: StepsOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    sampler: SamplerOpt = None,
    model: ModelOpt = None,
    cfg: CfgOpt = None,
    home: HomeOpt = None,
) -> None:
    """Add to Queue: every job of the pack, queued."""

    def go() -> None:
        settings = _settings(home=home)
        base = _pack_base(steps, width, height, sampler, model, cfg)
        expand = _expand_options(images_per_prompt, seed_mode, seed, max_jobs, base)
        _submit_pack("add_to_queue", file, None, priority, expand, settings)

    _guarded(go)


@app.command()
def demo(
    webui: Annotated[
        str | None, typer.Option("--webui", help="A real WebUI URL instead of the simulator.")
    ] = None,
    home: HomeOpt = None,
    output_dir: OutputOpt = None,
) -> None:
    """Run one direct and one queued job end to end (simulator by default), then show history."""

    def go() -> None:
        from contextlib import nullcontext

        from .controller import PipelineController
        from .history import JobHistoryStore
        from .runner import SingleNodeJobRunner
        from .webui.process import SimulatorProcess

        sim_context: Any = nullcontext() if webui else SimulatorProcess(step_seconds=0.01)
        with sim_context as sim:
            url = webui or sim.url
            settings = _settings(home=home, webui_url=url, output_dir=output_dir)
            console.print(f"WebUI: {url}{'' if webui else ' (simulator)'}")
            console.print(f"Prefect API: {settings.api_url()} (starting it if needed)")
            controller = PipelineController(settings=settings)
            config = PipelineConfig(
                prompt="a lighthouse on a cliff at dusk, oil painting",
                steps=12,
                width=512,
                height=512,
                img2img={"enabled": True},
                upscale={"enabled": True, "factor": 1.5},
            )
            console.rule("direct: run it now")
            with console.status("running..."):
                (direct,) = controller.run(config, run_mode="direct")
            _print_record(direct)
            console.rule("queue: add it to the queue, a worker drains it")
            # Pinned to a worker of the demo's own, so it never takes the user's queued jobs.
            demo_worker = f"demo-{uuid.uuid4().hex[:8]}"
            queued_job = controller.build_job(
                config,
                run_mode="queue",
                source="add_to_queue",
                prompt_source="manual",
                worker=demo_worker,
            )
            (queued,) = controller.submit([queued_job])
            console.print(f"queued {queued.job_id} as flow run {queued.flow_run_id}")
            with console.status("worker draining the queue..."):
                SingleNodeJobRunner(settings, worker_name=demo_worker).run_forever(
                    max_jobs=1, idle_timeout=60, only_pinned=True
                )
            _print_record(JobHistoryStore(settings).get(queued.job_id))
            console.rule("stablenew history")
            history(limit=10, home=settings.home)
            console.print(
                f"Prefect UI: {settings.api_url().removesuffix('/api')}  "
                "(`stablenew down` stops the server)"
            )

    _guarded(go)


def main() -> None:
    """Entry point of the ``stablenew`` console script."""
    disable_telemetry()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
