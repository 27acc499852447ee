"""PR-106 made real: run_mode decides how a job runs, and every job lands in Prefect's history.

A real Prefect server, a real worker process, the WebUI simulator over real HTTP.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterTags,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from pydantic import ValidationError
from support import generations_for, wait_terminal

from stablenew_core import (
    Job,
    JobHistoryStore,
    JobService,
    PipelineConfig,
    PipelineController,
    RunModeError,
    Settings,
)
from stablenew_core.prefect_env import prefect_settings


def flow_run_and_task_runs(settings: Settings, flow_run_id: str) -> tuple[Any, list[Any]]:
    with prefect_settings(settings), get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs: list[Any] = []
        deadline = time.monotonic() + 30
        # Task runs reach the database from events, a moment after the flow run ends.
        while time.monotonic() < deadline:
            task_runs = client.read_task_runs(
                task_run_filter=TaskRunFilter(
                    flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run.id])
                )
            )
            if task_runs and all(t.state and t.state.is_final() for t in task_runs):
                break
            time.sleep(0.2)
    return flow_run, task_runs


CONFIG = PipelineConfig(prompt="a lighthouse at dusk", steps=4, width=64, height=64, seed=7)


def test_direct_job_runs_in_process_and_is_recorded(settings: Settings, webui: Any) -> None:
    controller = PipelineController(settings=settings)
    (record,) = controller.run(CONFIG)

    assert record.status == "completed", record.error
    assert (record.run_mode, record.source, record.prompt_source) == ("direct", "run", "manual")
    assert record.outputs and all(p.endswith(".png") for p in record.outputs)
    assert len(generations_for(webui, record.job_id)) == 1

    flow_run, task_runs = flow_run_and_task_runs(settings, record.flow_run_id or "")
    assert flow_run.deployment_id is None, "a direct job must not become a deployment run"
    with prefect_settings(settings), get_client(sync_client=True) as client:
        runs_of_job = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"job:{record.job_id}"]))
        )
    assert [r.id for r in runs_of_job] == [flow_run.id], "exactly one run, never also queued"
    assert flow_run.state.is_completed()
    expected_tags = {
        "stablenew",
        "run_mode:direct",
        "source:run",
        "prompt_source:manual",
        f"job:{record.job_id}",
    }
    assert expected_tags <= set(flow_run.tags)
    job_runs = [t for t in task_runs if t.name.startswith("job-")]
    assert len(job_runs) == 1 and expected_tags <= set(job_runs[0].tags)
    assert job_runs[0].name == f"job-{record.job_id}"
    assert job_runs[0].state.is_completed()
    stage_runs = [t for t in task_runs if t is not job_runs[0]]
    assert [t.name for t in stage_runs] == ["txt2img"]
    assert all(not t.tags for t in stage_runs), "stage runs carry no tags (no slot round trip)"

    stored = JobHistoryStore(settings).get(record.job_id)
    assert stored.status == "completed"
    assert (stored.run_mode, stored.source, stored.prompt_source) == ("direct", "run", "manual")
    assert stored.outputs == record.outputs
    assert stored.config_snapshot == CONFIG.to_dict()
    assert stored.started_at and stored.finished_at and stored.created_at


def test_queued_job_becomes_a_deployment_run_drained_by_the_worker(
    settings: Settings, webui: Any, start_worker: Any
) -> None:
    controller = PipelineController(settings=settings)
    job = controller.build_job(
        CONFIG, run_mode="queue", source="add_to_queue", prompt_source="manual"
    )
    (record,) = controller.submit([job])

    assert record.status == "queued" and record.flow_run_id
    with prefect_settings(settings), get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(record.flow_run_id)
        deployment = client.read_deployment(flow_run.deployment_id)
    assert deployment.work_pool_name == settings.work_pool
    assert flow_run.state.is_scheduled()
    assert flow_run.parameters["job"]["job_id"] == job.job_id
    assert {"run_mode:queue", "source:add_to_queue", f"job:{job.job_id}"} <= set(flow_run.tags)
    time.sleep(0.5)
    assert generations_for(webui, job.job_id) == [], "submit_queued must not run the job"

    start_worker()
    done = wait_terminal(settings, job.job_id)
    assert done.status == "completed", done.error
    assert (done.run_mode, done.source) == ("queue", "add_to_queue")
    assert done.flow_run_id == record.flow_run_id
    assert len(generations_for(webui, job.job_id)) == 1
    _, task_runs = flow_run_and_task_runs(settings, record.flow_run_id)
    assert any("run_mode:queue" in t.tags for t in task_runs)


def test_every_entry_path_fills_the_metadata(settings: Settings) -> None:
    controller = PipelineController(settings=settings)
    manual = controller.build_job(
        CONFIG, run_mode=None, source="run", prompt_source="manual", prompt_pack_id="ignored"
    )
    pack = controller.build_job(
        CONFIG, run_mode="Direct", source="run_now", prompt_source="pack", prompt_pack_id="p1"
    )
    for job in (manual, pack):
        assert job.source in ("run", "run_now", "add_to_queue")
        assert job.prompt_source in ("manual", "pack")
        assert job.config_snapshot == CONFIG.to_dict()
        assert job.created_at.tzinfo is not None and job.created_at.utcoffset().total_seconds() == 0
    assert manual.run_mode == "queue" and manual.prompt_pack_id is None
    assert pack.run_mode == "direct" and pack.prompt_pack_id == "p1"
    assert "pack:p1" in pack.tags()


def test_failed_job_is_recorded_failed_with_its_error(settings: Settings, webui: Any) -> None:
    webui.inject("oom", 1)
    try:
        (record,) = PipelineController(settings=settings).run(CONFIG)
    finally:
        webui.clear_faults()
    assert record.status == "failed"
    assert record.error and "out of memory" in record.error.lower()

    flow_run, task_runs = flow_run_and_task_runs(settings, record.flow_run_id or "")
    assert flow_run.state.is_failed()
    assert any(t.name.startswith("job-") and t.state.is_failed() for t in task_runs)
    stored = JobHistoryStore(settings).get(record.job_id)
    assert stored.status == "failed" and stored.error
    assert JobHistoryStore(settings).list(status="failed", limit=200)


def test_unknown_run_mode_falls_back_to_queue_with_a_warning(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    controller = PipelineController(settings=settings)
    with caplog.at_level(logging.WARNING, logger="stablenew_core"):
        job = controller.build_job(CONFIG, run_mode="fast", source="run", prompt_source="manual")
    assert job.run_mode == "queue"
    assert "fast" in caplog.text
    assert (
        controller.build_job(CONFIG, run_mode="", source="run", prompt_source="manual").run_mode
        == "queue"
    )
    assert (
        controller.build_job(
            CONFIG, run_mode=" DIRECT ", source="run", prompt_source="manual"
        ).run_mode
        == "direct"
    )


def test_invalid_values_are_errors_that_name_the_field(settings: Settings) -> None:
    with pytest.raises(ValidationError, match="run_mode"):
        Job(config=CONFIG, run_mode="fast")
    with pytest.raises(ValidationError, match="source"):
        Job(config=CONFIG, source="gui")
    with pytest.raises(ValidationError, match="width"):
        PipelineConfig(prompt="x", width=500)
    service = JobService(settings)
    with pytest.raises(RunModeError, match="submit_direct"):
        service.submit_direct(Job(config=CONFIG, run_mode="queue"))
    with pytest.raises(RunModeError, match="submit_queued"):
        service.submit_queued(Job(config=CONFIG, run_mode="direct"))


def test_legacy_job_dict_loads_with_defaults() -> None:
    legacy = {"job_id": "legacy-1", "created_at": "2024-05-01T10:00:00", "config": {"prompt": "x"}}
    job = Job.model_validate(legacy)
    assert (job.run_mode, job.source, job.prompt_source) == ("queue", "unknown", "manual")
    assert job.prompt_pack_id is None and job.config_snapshot is None
    assert job.created_at.utcoffset().total_seconds() == 0


def test_same_job_submitted_twice_is_one_run(settings: Settings, webui: Any) -> None:
    controller = PipelineController(settings=settings)
    queued = controller.build_job(
        CONFIG, run_mode="queue", source="add_to_queue", prompt_source="manual"
    )
    first, second = controller.submit([queued, queued])
    assert first.flow_run_id == second.flow_run_id

    direct = controller.build_job(CONFIG, run_mode="direct", source="run", prompt_source="manual")
    one, two = controller.submit([direct, direct])
    assert one.flow_run_id == two.flow_run_id
    assert len(generations_for(webui, direct.job_id)) == 1


def test_one_direct_job_raced_from_two_threads_runs_once(settings: Settings, webui: Any) -> None:
    import threading

    controller = PipelineController(settings=settings)
    key = f"race-{time.time_ns()}"
    jobs = [
        controller.build_job(
            CONFIG, run_mode="direct", source="run", prompt_source="manual", idempotency_key=key
        )
        for _ in range(2)
    ]  # two job objects, one key: the second is a repeat whichever thread gets there first
    start = threading.Barrier(2)
    records: list[Any] = []

    def submit(job: Job) -> None:
        start.wait()
        records.append(controller.service.submit(job))

    threads = [threading.Thread(target=submit, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(records) == 2 and records[0].flow_run_id == records[1].flow_run_id
    generated = [g for job in jobs for g in generations_for(webui, job.job_id)]
    assert len(generated) == 1


def test_direct_job_reports_progress_to_the_caller_and_to_a_prefect_artifact(
    settings: Settings, webui: Any
) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    from stablenew_core.runtime import RunControl, use_control

    seen: list[tuple[str, float, str]] = []
    webui.set_step_seconds(0.03)
    try:
        with use_control(RunControl(progress=lambda *event: seen.append(event))):
            (record,) = PipelineController(settings=settings).run(
                CONFIG.model_copy(update={"steps": 80})
            )
    finally:
        webui.set_step_seconds(0.001)
    assert record.status == "completed"
    assert seen and all(stage == "txt2img" and 0 <= f <= 1 for stage, f, _ in seen)
    with prefect_settings(settings), get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[record.flow_run_id])),
        )
    assert artifacts and artifacts[0].key and artifacts[0].key.startswith("stablenew-progress-")
