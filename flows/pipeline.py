"""The pipeline flow: one job, run as a task, its stages as tasks inside it.

Reads like the pipeline it runs: wait for the GPU slot, run each planned stage (txt2img, then
img2img, ADetailer, upscale as enabled), write the manifest, publish the outputs. Everything a
stage sends to the WebUI or writes to disk lives in :mod:`stablenew_core.stages` and
:mod:`stablenew_core.outputs`; this module adds tags, retries, caching and artifacts.

Both run modes execute this same function: direct calls it in-process, the queue's worker runs
it for deployment runs.
"""

from __future__ import annotations

import contextvars
import functools
import time
from datetime import timedelta
from typing import Any

from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TagsContext, TaskRunContext
from prefect.states import Cancelled, State
from prefect.transactions import CommitMode, transaction

from stablenew_core.errors import JobCancelledError, WebUIError
from stablenew_core.gpu_slot import GpuSlot
from stablenew_core.jobs import Job, JobResult, outputs_artifact_key, progress_artifact_key
from stablenew_core.outputs import job_output_dir, write_manifest
from stablenew_core.runtime import current_control, current_runtime
from stablenew_core.stages import StageName, StageResult, planned_stages, run_stage

from ._cancel import CancelWatcher

FLOW_NAME = "stablenew-pipeline"


def _stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Same job, stage and input images -> same key: a re-run resumes after finished stages."""
    job: Job = parameters["job"]
    previous: StageResult | None = parameters["previous"]
    inputs = "-".join(image.sha256[:12] for image in previous.images) if previous else "none"
    return f"stablenew-{job.job_id}-{parameters['stage']}-{inputs}"


def _retry_transient(task: Any, task_run: Any, state: State) -> bool:
    """Retry only WebUI faults that can pass (unreachable, timeout, dropped connection)."""
    try:
        state.result(raise_on_failure=True)
    except WebUIError as exc:
        return exc.transient
    except BaseException:
        return False
    return False


class _Progress:
    """The job's progress artifact: created on the first report made while the job still runs,
    then updated at most once a second and at each stage's end.

    A job that ends before its first progress poll gets none (a bar that only ever shows 100%
    would cost an API call per job for nothing).
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        self.stages = planned_stages(job.config)
        self.artifact_id: Any = None
        self.last = 0.0

    def report(self, stage: StageName, fraction: float, text: str = "") -> None:
        position = self.stages.index(stage)
        percent = 100.0 * (position + max(0.0, min(fraction, 1.0))) / len(self.stages)
        now = time.monotonic()
        if now - self.last < 1.0 and fraction < 1.0:
            return
        self.last = now
        description = f"{stage} {text}".strip()
        if self.artifact_id is None:
            if percent >= 100.0:
                return
            self.artifact_id = create_progress_artifact(
                progress=percent,
                key=progress_artifact_key(self.job.job_id),
                description=description,
            )
        else:
            update_progress_artifact(self.artifact_id, progress=percent, description=description)


_job_progress: contextvars.ContextVar[_Progress | None] = contextvars.ContextVar(
    "stablenew_job_progress", default=None
)


@task(
    name="stage",
    task_run_name="{stage}",
    persist_result=True,
    cache_key_fn=_stage_cache_key,
    cache_expiration=timedelta(days=7),
    retry_condition_fn=_retry_transient,
)
def stage_task(job: Job, stage: StageName, previous: StageResult | None) -> StageResult:
    """Run one stage of the job against the WebUI."""
    runtime = current_runtime()
    control = current_control()
    artifact = _job_progress.get() or _Progress(job)
    # Progress arrives on the stage's polling thread: report it in this task's context, so the
    # progress artifact belongs to this run.
    context = contextvars.copy_context()

    def on_progress(fraction: float, text: str) -> None:
        context.run(artifact.report, stage, fraction, text)
        if control.progress is not None:
            control.progress(str(stage), fraction, text)

    return run_stage(
        runtime.client,
        job,
        stage,
        previous,
        job_output_dir(runtime.settings.outputs, job),
        on_progress=on_progress,
        should_stop=control.should_stop,
        poll_seconds=runtime.settings.progress_poll_seconds,
    )


@functools.cache
def _stage_runner(retries: int, retry_delay_seconds: float) -> Any:
    """The stage task with the configured retries (built once: a Task costs ~1 ms to build)."""
    return stage_task.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)


@task(name="job", task_run_name="job-{job.job_id}")
def job_task(job: Job) -> JobResult | State:
    """Run every planned stage of one job, holding the GPU slot; write its manifest."""
    runtime = current_runtime()
    settings = runtime.settings
    logger = get_run_logger()
    control = current_control()
    stages = planned_stages(job.config)
    slot = GpuSlot(settings.home / "gpu", settings.webui_url)

    def waiting(holder: str | None) -> None:
        logger.info("waiting for GPU (held by %s)", holder or "another job")

    stage_runner = _stage_runner(settings.transient_retries, settings.retry_backoff_seconds)
    results: list[StageResult] = []
    progress_token = _job_progress.set(_Progress(job))
    flow_context = FlowRunContext.get()
    flow_run_id = flow_context.flow_run.id if flow_context and flow_context.flow_run else None
    try:
        with (
            CancelWatcher(flow_run_id, control, settings),
            slot.hold(f"job {job.job_id}", on_wait=waiting, should_stop=control.should_stop),
            # Each finished stage's result is committed at once (not when the job ends), so a
            # job resumed after a crash finds the stages it had finished.
            transaction(commit_mode=CommitMode.EAGER),
            # Stage task runs carry no tags: Prefect checks tag concurrency limits with an API
            # call for every tagged task run, and the job's task run already has the job's tags.
            TagsContext(current_tags=set()),
        ):
            previous: StageResult | None = None
            for stage in stages:
                if control.should_stop():
                    raise JobCancelledError(f"job {job.job_id} cancelled before {stage}")
                previous = stage_runner(job, stage, previous)
                results.append(previous)
    except JobCancelledError as exc:
        return Cancelled(message=f"cancelled: {exc}")
    finally:
        _job_progress.reset(progress_token)
    manifest = write_manifest(job, results, job_output_dir(settings.outputs, job))
    final = results[-1]
    outputs = [image.path for image in final.images]
    create_table_artifact(
        key=outputs_artifact_key(job.job_id),
        table=[
            {"stage": str(r.stage), "index": i.index, "path": i.path, "seed": i.seed}
            for r in results
            for i in r.images
        ],
        description=f"Images of job {job.job_id} (final: {len(outputs)})",
    )
    return JobResult(
        job_id=job.job_id, outputs=outputs, manifest_path=str(manifest), seeds=final.seeds
    )


@flow(name=FLOW_NAME, flow_run_name="{job.source}-{job.job_id}", validate_parameters=True)
def pipeline(job: Job) -> JobResult | State:
    """Generate the images of one job: txt2img, then each enabled stage."""
    with tags(*job.tags()):  # the flow run's tags, inherited by the job's task run
        state = job_task(job, return_state=True)
    if state.is_cancelled():
        # A fresh state, so the run keeps the job's own reason (not "1/1 states cancelled").
        return Cancelled(message=state.message or "cancelled")
    return state.result()
