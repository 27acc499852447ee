"""Credentials (WebUI basic auth, Prefect API key) never land in tags, parameters, snapshots,
manifests, PNG chunks, run logs, worker output or webhook bodies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from pydantic import SecretStr
from support import wait_terminal

from stablenew_core import JobHistoryStore, PipelineConfig, PipelineController, Settings
from stablenew_core.notify import JobNotification
from stablenew_core.outputs import read_png_text
from stablenew_core.prefect_env import prefect_settings
from stablenew_core.webui.process import SimulatorProcess

WEBUI_PASSWORD = "webui-s3cret-Pa55"
API_KEY = "pnu_s3cretApiKey0000"


@pytest.fixture
def auth_webui() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(step_seconds=0.001, auth=("artist", WEBUI_PASSWORD)) as sim:
        yield sim


def test_no_secret_anywhere_a_job_leaves_a_trace(
    settings: Settings, auth_webui: SimulatorProcess, start_worker: Any
) -> None:
    settings = settings.model_copy(
        update={
            "webui_url": auth_webui.url,
            "webui_user": "artist",
            "webui_password": SecretStr(WEBUI_PASSWORD),
            "prefect_api_key": SecretStr(API_KEY),
        }
    )
    assert WEBUI_PASSWORD not in repr(settings) and API_KEY not in repr(settings)
    controller = PipelineController(settings=settings)
    config = PipelineConfig(prompt="a vault door", steps=3, width=64, height=64)
    (direct,) = controller.run(config)
    queued_job = controller.build_job(
        config, run_mode="queue", source="add_to_queue", prompt_source="manual"
    )
    controller.submit([queued_job])
    worker = start_worker(settings_override=settings)
    queued = wait_terminal(settings, queued_job.job_id)
    assert direct.status == queued.status == "completed", (direct.error, queued.error)

    traces: list[str] = [worker.output()]
    with prefect_settings(settings), get_client(sync_client=True) as client:
        for record in (direct, queued):
            run = client.read_flow_run(record.flow_run_id)
            traces += [json.dumps(run.parameters), " ".join(run.tags), run.model_dump_json()]
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            )
            traces += [log.message for log in logs]
    for record in JobHistoryStore(settings).list(limit=200):
        traces.append(record.model_dump_json())
        traces.append(JobNotification.from_record(record).model_dump_json())
    for record in (direct, queued):
        job_dir = Path(record.outputs[0]).parent
        traces.append((job_dir / "manifest.json").read_text())
        for png in job_dir.glob("*.png"):
            traces.append(json.dumps(read_png_text(png)))
    assert len(traces) > 10
    for trace in traces:
        assert WEBUI_PASSWORD not in trace
        assert API_KEY not in trace
