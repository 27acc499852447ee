"""The two client-side shortcuts in ``stablenew_core._prefect_internals`` keep Prefect's behaviour.

* Tag concurrency: a task run whose tags have no ``tag:`` limit skips Prefect's acquisition; a
  limit that exists still holds a job back until a slot is free.
* The suspension observer is skipped only inside ``without_suspension_observer`` (the queue
  worker's runs); elsewhere Prefect's own observer runs.
* Both guards fail loudly when an upgrade moves the names they patch.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import prefect.flow_engine
import prefect.task_engine
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from support import generations_for

from stablenew_core import JobRecord, PipelineConfig, PipelineController, Settings
from stablenew_core import _prefect_internals as internals
from stablenew_core.prefect_env import prefect_settings

CONFIG = PipelineConfig(prompt="a tag-limited lighthouse", steps=4, width=64, height=64, seed=3)


def test_a_tag_limit_still_holds_a_job_until_its_slot_is_free(
    settings: Settings, webui: Any
) -> None:
    controller = PipelineController(settings=settings)
    job = controller.build_job(CONFIG, run_mode="direct", source="run", prompt_source="manual")
    limit = f"tag:job:{job.job_id}"
    records: list[JobRecord] = []
    with prefect_settings(settings), get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    internals.tag_limits.forget()  # the limit is new: do not wait for the cache to expire
    try:
        with prefect_settings(settings), concurrency(limit, occupy=1):  # hold the only slot
            runner = threading.Thread(target=lambda: records.append(controller.service.submit(job)))
            runner.start()
            time.sleep(1.5)  # room for the job to run if the limit were ignored
            released = time.time()
        runner.join(timeout=60)
        assert not runner.is_alive()
        (record,) = records
        assert record.status == "completed"
        (generation,) = generations_for(webui, job.job_id)
        assert generation["started_at"] > released
    finally:
        with prefect_settings(settings), get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(limit)
        internals.tag_limits.forget()


def test_tag_limits_are_read_once_per_ttl_and_unknown_means_check(settings: Settings) -> None:
    internals.tag_limits.forget()
    name = f"tag:probe-{uuid.uuid4().hex[:8]}"
    with prefect_settings(settings):
        assert not internals.tag_limits.may_apply([name])
        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=2))
        try:
            assert not internals.tag_limits.may_apply([name])  # cached until the TTL passes
            internals.tag_limits.forget()
            assert internals.tag_limits.may_apply([name, "tag:other"])
        finally:
            with get_client(sync_client=True) as client:
                client.delete_global_concurrency_limit_by_name(name)
    unreachable = settings.model_copy(update={"prefect_api_url": "http://127.0.0.1:9/api"})
    internals.tag_limits.forget()
    with prefect_settings(unreachable):
        assert internals.tag_limits.may_apply([name])  # cannot read: let Prefect decide
    internals.tag_limits.forget()


def test_the_suspension_observer_is_skipped_only_inside_the_block(settings: Settings) -> None:
    from prefect import flow
    from prefect._flow_run_suspension import FlowRunSuspensionRequest

    @flow(name="stablenew-observer-probe")
    def probe() -> None:
        return None

    internals.install()
    observe = prefect.flow_engine.observe_flow_run_suspension
    with prefect_settings(settings), get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(probe)
        before = threading.active_count()
        with (
            internals.without_suspension_observer(),
            observe(flow_run.id, FlowRunSuspensionRequest()),
        ):
            assert threading.active_count() == before
        with observe(flow_run.id, FlowRunSuspensionRequest()):
            assert threading.active_count() == before + 1  # Prefect's observer thread


def test_guards_fail_loudly_when_prefect_moves_the_patched_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    internals.check_internals()

    def moved_observer(run_id: Any) -> None:
        return None

    monkeypatch.setattr(prefect.flow_engine, "observe_flow_run_suspension", moved_observer)
    with pytest.raises(internals.PrefectInternalsChanged, match="observe_flow_run_suspension"):
        internals.check_internals()
    monkeypatch.undo()

    def moved_acquire(names: Any, occupy: int = 1) -> None:
        return None

    monkeypatch.setattr(prefect.task_engine, "_concurrency", moved_acquire)
    with pytest.raises(internals.PrefectInternalsChanged, match="_concurrency"):
        internals.check_internals()
