"""JobHistoryStore's fast read path against a real Prefect server (SQLite).

The store parses ``/flow_runs/filter`` into slim models, keeps one Prefect client, looks up
outputs artifacts by their own flow run id and sends a status filter as ``in`` or ``not in``;
these tests hold it to what Prefect's own objects say, across pages, in both filter forms.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from support import wait_terminal

from stablenew_core import JobHistoryStore, PipelineConfig, PipelineController, Settings
from stablenew_core import history as history_module
from stablenew_core.prefect_env import prefect_settings
from stablenew_core.records import record_from_flow_run

CONFIG = PipelineConfig(prompt="a lantern in fog", steps=3, width=64, height=64, seed=5)


def _full_record(settings: Settings, flow_run_id: str, outputs: list[str]) -> Any:
    """The record built from Prefect's full FlowRun object (the path the slim parse replaces)."""
    with prefect_settings(settings), get_client(sync_client=True) as client:
        return record_from_flow_run(client.read_flow_run(uuid.UUID(flow_run_id)), outputs)


def test_slim_records_equal_records_from_prefects_flow_runs(settings: Settings, webui: Any) -> None:
    controller = PipelineController(settings=settings)
    pack_id = f"slim-{uuid.uuid4().hex[:6]}"
    direct = controller.build_job(
        CONFIG, run_mode="direct", source="run_now", prompt_source="pack", prompt_pack_id=pack_id
    )
    failing = controller.build_job(
        CONFIG, run_mode="direct", source="run", prompt_source="pack", prompt_pack_id=pack_id
    )
    queued = controller.build_job(
        CONFIG,
        run_mode="queue",
        source="add_to_queue",
        prompt_source="pack",
        prompt_pack_id=pack_id,
    )
    controller.submit([direct])
    webui.inject("oom", 1)
    try:
        controller.submit([failing])
    finally:
        webui.clear_faults()
    controller.submit([queued])
    history = JobHistoryStore(settings)
    records = history.list(prompt_pack_id=pack_id)
    assert [r.job_id for r in records] == [queued.job_id, failing.job_id, direct.job_id]
    by_id = {r.job_id: r for r in records}
    assert by_id[direct.job_id].status == "completed" and by_id[direct.job_id].outputs
    assert by_id[queued.job_id].status == "queued"
    assert by_id[failing.job_id].status == "failed" and by_id[failing.job_id].error
    for record in records:
        assert record.flow_run_id is not None
        assert record == _full_record(settings, record.flow_run_id, record.outputs)
        assert history.get(record.job_id) == record
    history.close()


@pytest.mark.parametrize("status", ["queued", "completed", "failed", "running"])
def test_status_filter_forms_return_the_same_pages(
    settings: Settings, webui: Any, status: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller = PipelineController(settings=settings)
    pack_id = f"forms-{uuid.uuid4().hex[:6]}"
    jobs = [
        controller.build_job(
            CONFIG, run_mode="queue", source="add_to_queue", prompt_source="pack",
            prompt_pack_id=pack_id,
        )
        for _ in range(6)
    ]  # fmt: skip
    controller.submit(jobs)
    done = controller.build_job(
        CONFIG, run_mode="direct", source="run", prompt_source="pack", prompt_pack_id=pack_id
    )
    controller.submit([done])
    history = JobHistoryStore(settings)
    results = {}
    for form, threshold in (("in", 10**9), ("not in", -1)):
        monkeypatch.setattr(history_module, "SMALL_STATUS_SET", threshold)
        results[form] = (
            history.list(prompt_pack_id=pack_id, status=status, limit=100),
            [
                history.list(prompt_pack_id=pack_id, status=status, limit=2, offset=o)
                for o in (0, 2, 4)
            ],
        )
    assert results["in"] == results["not in"]
    expected = {"queued": [j.job_id for j in reversed(jobs)], "completed": [done.job_id]}
    assert [r.job_id for r in results["in"][0]] == expected.get(status, [])
    assert [r.job_id for page in results["in"][1] for r in page] == expected.get(status, [])[:6]


def test_status_filter_pages_through_more_than_200_jobs_in_both_forms(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    controller = PipelineController(settings=settings)
    pack_id = f"many-{uuid.uuid4().hex[:6]}"
    jobs = [
        controller.build_job(
            CONFIG, run_mode="queue", source="add_to_queue", prompt_source="pack",
            prompt_pack_id=pack_id,
        )
        for _ in range(205)
    ]  # fmt: skip
    controller.submit(jobs)
    history = JobHistoryStore(settings)
    newest_first = [j.job_id for j in reversed(jobs)]
    for threshold in (10**9, -1):  # "in", then "not in"
        monkeypatch.setattr(history_module, "SMALL_STATUS_SET", threshold)
        everything = history.list(prompt_pack_id=pack_id, status="queued", limit=1000)
        assert [r.job_id for r in everything] == newest_first
        window = history.list(prompt_pack_id=pack_id, status="queued", limit=20, offset=190)
        assert [r.job_id for r in window] == newest_first[190:]
    assert history.count(prompt_pack_id=pack_id, status="queued") == 205


def test_store_keeps_one_client_and_reopens_after_close(settings: Settings) -> None:
    history = JobHistoryStore(settings)
    first = history._client()
    history.list(limit=1)
    history.count()
    assert history._client() is first
    history.close()
    history.close()  # twice is fine
    assert history.list(limit=1) is not None
    assert history._client() is not first
    with JobHistoryStore(settings) as scoped:
        scoped.count()
    assert scoped._shared is None


def test_direct_job_outputs_read_back_after_a_resume_style_second_artifact(
    settings: Settings, webui: Any
) -> None:
    """Two outputs artifacts for one run (a resumed job): the newest one wins."""
    from prefect.client.schemas.actions import ArtifactCreate

    from stablenew_core.jobs import outputs_artifact_key

    controller = PipelineController(settings=settings)
    (record,) = controller.run(CONFIG)
    record = wait_terminal(settings, record.job_id, timeout=60)
    assert record.flow_run_id is not None
    with prefect_settings(settings), get_client(sync_client=True) as client:
        client.create_artifact(
            ArtifactCreate(
                key=outputs_artifact_key(record.job_id),
                type="table",
                data=[{"stage": "upscale", "index": 0, "path": "/later/upscale_0.png", "seed": 1}],
                flow_run_id=uuid.UUID(record.flow_run_id),
            )
        )
    assert JobHistoryStore(settings).get(record.job_id).outputs == ["/later/upscale_0.png"]
