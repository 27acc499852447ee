"""The long-lived worker: hand-over order, one GPU slot across modes, zombie reaping, and the
guard on the Prefect internals it adjusts."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import prefect
import prefect.flow_engine
import pytest
from support import (
    SETTLED,
    generations_for,
    state_names,
    wait_for,
    wait_status,
    wait_terminal,
)

from stablenew_core import JobHistoryStore, PipelineConfig, PipelineController, Settings
from stablenew_core._prefect_internals import PrefectInternalsChanged, check_internals

SMALL = PipelineConfig(prompt="a field of poppies", steps=3, width=64, height=64, seed=3)


def queue_job(controller: PipelineController, config: PipelineConfig = SMALL) -> Any:
    job = controller.build_job(
        config, run_mode="queue", source="add_to_queue", prompt_source="manual"
    )
    (record,) = controller.submit([job])
    return record


def test_worker_hands_over_in_submission_order_never_two_at_once(
    settings: Settings, webui: Any, start_worker: Any
) -> None:
    controller = PipelineController(settings=settings)
    records = [queue_job(controller) for _ in range(6)]
    start_worker()
    for record in records:
        assert wait_terminal(settings, record.job_id).status == "completed"
    spans = [generations_for(webui, r.job_id)[0] for r in records]
    starts = [g["started_at"] for g in spans]
    assert starts == sorted(starts), "jobs must start in submission order"
    for earlier, later in itertools.pairwise(spans):
        assert earlier["finished_at"] <= later["started_at"]


def test_direct_and_queued_jobs_share_one_gpu_slot(
    settings: Settings, slow_webui: Any, start_worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    chain = PipelineConfig.model_validate(
        {**SMALL.to_dict(), "steps": 50, "img2img": {"enabled": True}, "upscale": {"enabled": True}}
    )
    controller = PipelineController(settings=settings)
    queued = queue_job(controller, chain)
    start_worker()
    wait_for(lambda: generations_for(slow_webui, queued.job_id), timeout=60, poll=0.02)
    with caplog.at_level(logging.INFO):
        (direct,) = controller.run(chain)
    assert direct.status == "completed"
    assert wait_terminal(settings, queued.job_id).status == "completed"
    queued_end = max(g["finished_at"] for g in generations_for(slow_webui, queued.job_id))
    direct_start = min(g["started_at"] for g in generations_for(slow_webui, direct.job_id))
    assert direct_start >= queued_end, "the direct job must wait for the queued job's chain"
    assert "waiting for GPU" in caplog.text


def test_zombie_run_is_crashed_and_resumed_once_by_the_next_worker(
    settings: Settings, slow_webui: Any, start_worker: Any
) -> None:
    controller = PipelineController(settings=settings)
    config = PipelineConfig.model_validate(
        {**SMALL.to_dict(), "steps": 60, "img2img": {"enabled": True}}
    )
    victim = queue_job(controller, config)
    first = start_worker()
    wait_for(lambda: generations_for(slow_webui, victim.job_id, "img2img"), timeout=60, poll=0.02)
    first.kill()  # kill -9: worker and job die together; the run stays Running
    assert JobHistoryStore(settings).get(victim.job_id).status == "running"

    start_worker()
    record = wait_status(settings, victim.job_id, SETTLED, timeout=60)
    assert record.status == "completed", record.error
    names = state_names(settings, victim.flow_run_id)
    assert "Crashed" in names and "Resuming" in names
    # resumed at the stage it had reached: txt2img was finished and is not generated again
    assert len(generations_for(slow_webui, victim.job_id, "txt2img")) == 1


def test_zombie_with_crash_policy_never_ends_crashed_with_the_reason(
    settings: Settings, slow_webui: Any, start_worker: Any
) -> None:
    settings = settings.model_copy(update={"crash_policy": "never"})
    controller = PipelineController(settings=settings)
    victim = queue_job(controller, SMALL.model_copy(update={"steps": 100}))
    first = start_worker(settings_override=settings)
    wait_status(settings, victim.job_id, ("running",), timeout=60)
    first.kill()
    start_worker(settings_override=settings)
    record = wait_terminal(settings, victim.job_id, timeout=60)
    assert record.status == "crashed"
    assert record.error and "worker" in record.error and "gone" in record.error


def test_internals_guard_passes_on_the_pinned_prefect() -> None:
    check_internals()


def test_internals_guard_fails_loudly_when_prefect_moves_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def moved(engine: Any) -> None:  # an upgrade that dropped join_on_exit
        return None

    monkeypatch.setattr(prefect.flow_engine, "_send_heartbeats", moved)
    with pytest.raises(PrefectInternalsChanged, match="_send_heartbeats"):
        check_internals()
    monkeypatch.undo()
    monkeypatch.setattr(prefect, "__version__", "3.99.0")
    with pytest.raises(PrefectInternalsChanged, match=r"3\.99\.0"):
        check_internals()


def test_server_patch_opens_sqlite_write_transactions_immediate() -> None:
    from prefect.server.database import configurations

    from stablenew_core._prefect_internals import check_server_internals, install_server_patches

    check_server_internals()
    original = configurations.AioSqliteConfiguration.begin_transaction
    try:
        install_server_patches()
        patched = configurations.AioSqliteConfiguration.begin_transaction
        assert patched is not original
        assert patched.__wrapped_original__ is original  # type: ignore[attr-defined]
        check_server_internals()  # still recognises the original behind the patch
    finally:
        configurations.AioSqliteConfiguration.begin_transaction = original  # type: ignore[method-assign]


def test_server_guard_fails_loudly_when_prefect_moves_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.server.database import configurations

    from stablenew_core._prefect_internals import check_server_internals

    async def moved(self: Any, session: Any) -> None:
        return None

    monkeypatch.setattr(configurations.AioSqliteConfiguration, "begin_transaction", moved)
    with pytest.raises(PrefectInternalsChanged, match="begin_transaction"):
        check_server_internals()


def test_service_guard_passes_and_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.concurrency.services import ConcurrencySlotAcquisitionWithLeaseService

    from stablenew_core._prefect_internals import check_service_internals

    check_service_internals()

    def moved(self: Any) -> None:  # an upgrade that changed _drain's parameters
        return None

    monkeypatch.setattr(ConcurrencySlotAcquisitionWithLeaseService, "_drain", moved)
    with pytest.raises(PrefectInternalsChanged, match="_drain"):
        check_service_internals()


def test_releasing_job_services_keeps_the_events_and_log_workers(settings: Settings) -> None:
    """Only the tag-slot services stop after a job; Prefect's events and log workers live on."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    from stablenew_core._prefect_internals import release_job_services
    from stablenew_core.prefect_env import prefect_settings

    controller = PipelineController(settings=settings)
    (first,) = controller.run(SMALL)
    with prefect_settings(settings):
        events, logs = EventsWorker.instance(), APILogWorker.instance()
    release_job_services()
    (second,) = controller.run(SMALL)
    assert first.status == second.status == "completed"
    with prefect_settings(settings):
        assert EventsWorker.instance() is events
        assert APILogWorker.instance() is logs
