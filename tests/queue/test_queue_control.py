"""Queue control on Prefect's own mechanisms: pause, cancel, priority, retry, idempotency,
webhooks. A real server, real worker processes, the simulator over real HTTP."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from support import generations_for, wait_for, wait_status, wait_terminal

from stablenew_core import (
    JobService,
    JobStateError,
    PipelineConfig,
    PipelineController,
    Settings,
)

SMALL = PipelineConfig(prompt="a quiet harbour", steps=3, width=64, height=64, seed=1)


def queued(controller: PipelineController, config: PipelineConfig = SMALL, **kw: Any) -> Any:
    job = controller.build_job(
        config, run_mode="queue", source="add_to_queue", prompt_source="manual", **kw
    )
    (record,) = controller.submit([job])
    return record


def test_pause_holds_new_jobs_and_resume_releases_them(
    settings: Settings, webui: Any, start_worker: Any
) -> None:
    service = JobService(settings)
    controller = PipelineController(service)
    service.pause()
    assert service.status().paused
    first, second = queued(controller), queued(controller)
    start_worker()
    wait_for(lambda: any(w.status == "online" for w in service.status().workers), timeout=60)
    assert service.status().queued == 2
    assert generations_for(webui, first.job_id) == []
    service.resume()
    assert not service.status().paused
    assert wait_terminal(settings, first.job_id).status == "completed"
    assert wait_terminal(settings, second.job_id).status == "completed"


def test_cancel_a_queued_job_and_it_never_starts(
    settings: Settings, webui: Any, start_worker: Any
) -> None:
    service = JobService(settings)
    controller = PipelineController(service)
    doomed, kept = queued(controller), queued(controller)
    assert service.cancel(doomed.job_id).status == "cancelled"
    start_worker()
    assert wait_terminal(settings, kept.job_id).status == "completed"
    assert generations_for(webui, doomed.job_id) == []
    with pytest.raises(JobStateError, match="already ended"):
        service.cancel(doomed.job_id)


def test_cancel_a_running_job_interrupts_its_webui_task_and_the_worker_goes_on(
    settings: Settings, slow_webui: Any, start_worker: Any
) -> None:
    service = JobService(settings)
    controller = PipelineController(service)
    long_job = queued(controller, SMALL.model_copy(update={"steps": 150}))
    next_job = queued(controller)
    start_worker(plain_env=True)  # as a user starts it: only STABLENEW_* in its environment
    wait_status(settings, long_job.job_id, ("running",), timeout=60)
    wait_for(lambda: generations_for(slow_webui, long_job.job_id), timeout=30)
    service.cancel(long_job.job_id)
    record = wait_terminal(settings, long_job.job_id, timeout=60)
    assert record.status == "cancelled"
    assert record.error and "cancelled" in record.error and "states cancelled" not in record.error
    outcomes = [g["outcome"] for g in generations_for(slow_webui, long_job.job_id)]
    assert outcomes == ["interrupted"]
    assert wait_terminal(settings, next_job.job_id).status == "completed"


def test_priorities_and_move_to_front_order_the_queue(
    settings: Settings, webui: Any, start_worker: Any
) -> None:
    controller = PipelineController(settings=settings)
    low = queued(controller, priority="low")
    normal = queued(controller)
    high = queued(controller, priority="high")
    normal_late = queued(controller)
    JobService(settings).move_to_front(normal_late.job_id)
    start_worker()
    for record in (low, normal, high, normal_late):
        assert wait_terminal(settings, record.job_id).status == "completed"
    starts = {
        r.job_id: generations_for(webui, r.job_id)[0]["started_at"]
        for r in (low, normal, high, normal_late)
    }
    order = sorted(starts, key=starts.__getitem__)
    assert order == [high.job_id, normal_late.job_id, normal.job_id, low.job_id]


def test_retry_a_failed_job_with_config_edits(settings: Settings, webui: Any) -> None:
    service = JobService(settings)
    controller = PipelineController(service)
    webui.inject("oom", 1)
    try:
        (failed,) = controller.run(SMALL)
    finally:
        webui.clear_faults()
    assert failed.status == "failed"
    assert len(generations_for(webui, failed.job_id)) == 1, "out-of-memory is never retried"

    retried = service.retry(failed.job_id, edits={"width": 128, "hires": {"enabled": False}})
    assert retried.status == "completed"
    assert retried.retried_from == failed.job_id and retried.job_id != failed.job_id
    assert retried.config_snapshot and retried.config_snapshot["width"] == 128
    assert (retried.run_mode, retried.source) == ("direct", "run")
    with pytest.raises(JobStateError, match="only failed, crashed or cancelled"):
        service.retry(retried.job_id)


def test_transient_fault_is_retried_at_the_failed_stage(settings: Settings, webui: Any) -> None:
    config = PipelineConfig.model_validate({**SMALL.to_dict(), "img2img": {"enabled": True}})
    webui.inject("drop", 1, routes=["img2img"])
    try:
        (record,) = PipelineController(settings=settings).run(config)
    finally:
        webui.clear_faults()
    assert record.status == "completed", record.error
    assert len(generations_for(webui, record.job_id, "txt2img")) == 1
    assert len(generations_for(webui, record.job_id, "img2img")) == 2


def test_rejected_request_is_not_retried(settings: Settings, webui: Any) -> None:
    webui.inject("422", 1)
    try:
        (record,) = PipelineController(settings=settings).run(SMALL)
    finally:
        webui.clear_faults()
    assert record.status == "failed"
    assert len(generations_for(webui, record.job_id)) == 1


def test_idempotency_key_submits_once(settings: Settings) -> None:
    controller = PipelineController(settings=settings)
    key = f"nightly-{uuid.uuid4().hex[:6]}"
    first = queued(controller, idempotency_key=key)
    second = queued(controller, idempotency_key=key)  # a new job object, the same key
    assert first.flow_run_id == second.flow_run_id
    assert second.job_id == first.job_id, "the repeat reports the job that exists"
    assert JobService(settings).history.get(second.job_id).flow_run_id == first.flow_run_id


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]
    fail_first: int

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server: Any = self.server
        server.attempts += 1
        if server.attempts <= server.fail_first:
            self.send_response(500)
        else:
            server.received.append(body)
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[Any]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.received, server.attempts, server.fail_first = [], 0, 1
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_gets_every_terminal_state_and_retries_delivery(
    settings: Settings, webui: Any, webhook: Any
) -> None:
    url = f"http://127.0.0.1:{webhook.server_address[1]}/hook"
    settings = settings.model_copy(
        update={"webhook_url": url, "webhook_backoff_seconds": 0.05, "webui_password": None}
    )
    service = JobService(settings)
    controller = PipelineController(service)
    (done,) = controller.run(SMALL)
    webui.inject("500", 1)
    try:
        (failed,) = controller.run(SMALL)
    finally:
        webui.clear_faults()
    cancelled = queued(controller)
    service.cancel(cancelled.job_id)

    got = wait_for(lambda: len(webhook.received) >= 3 and webhook.received, timeout=30)
    by_job = {body["job_id"]: body for body in got}
    assert by_job[done.job_id]["status"] == "completed" and by_job[done.job_id]["outputs"]
    assert by_job[failed.job_id]["status"] == "failed" and by_job[failed.job_id]["error"]
    assert by_job[cancelled.job_id]["status"] == "cancelled"
    assert webhook.attempts == len(got) + 1, "the first delivery failed and was retried"


def test_failing_webhook_never_fails_the_job(settings: Settings) -> None:
    settings = settings.model_copy(
        update={"webhook_url": "http://127.0.0.1:9/nothing-listens", "webhook_attempts": 2}
    )
    (record,) = PipelineController(settings=settings).run(SMALL)
    assert record.status == "completed"
