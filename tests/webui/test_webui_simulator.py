"""The simulator behaves as A1111 does where the orchestrator depends on it.

One generation at a time in arrival order, per-task progress for ``force_task_id``, interrupt
of whatever runs now, A1111's answers and errors, fault injection and its statistics.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from stablenew_core.errors import WebUIGenerationError
from stablenew_core.webui.client import WebUIClient
from stablenew_core.webui.process import SimulatorProcess

Waiter = Callable[..., None]


class Background:
    """One request running in a thread; ``join()`` returns its result or raises its error."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._call = call
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._call()
        except BaseException as exc:
            self._error = exc

    def join(self) -> Any:
        self._thread.join(60)
        assert not self._thread.is_alive(), "the request never returned"
        if self._error is not None:
            raise self._error
        return self._result


def _txt2img(client: WebUIClient, task_id: str, steps: int, n_iter: int = 1) -> Background:
    payload = {
        "prompt": task_id,
        "steps": steps,
        "n_iter": n_iter,
        "width": 64,
        "height": 64,
        "force_task_id": task_id,
    }
    return Background(lambda: client.txt2img(payload))


def test_one_generation_at_a_time_in_arrival_order(
    client: WebUIClient, sim: SimulatorProcess, wait_for: Waiter
) -> None:
    sim.set_step_seconds(0.005)
    first = _txt2img(client, "fifo-a", steps=60)
    wait_for(lambda: client.task_progress("fifo-a")["active"], "fifo-a to run")
    second = _txt2img(client, "fifo-b", steps=5)
    wait_for(lambda: client.task_progress("fifo-b")["queued"], "fifo-b to queue")
    third = _txt2img(client, "fifo-c", steps=5)
    wait_for(lambda: client.task_progress("fifo-c")["queued"], "fifo-c to queue")
    assert client.task_progress("fifo-a")["active"], "a queued request must not start"
    for request in (first, second, third):
        assert len(request.join().images) == 1

    stats = sim.stats()
    assert stats["max_concurrent"] == 1
    runs = stats["generations"]
    assert [g["force_task_id"] for g in runs] == ["fifo-a", "fifo-b", "fifo-c"]
    for earlier, later in itertools.pairwise(runs):
        assert earlier["finished_at"] <= later["started_at"]
    assert all(g["outcome"] == "ok" for g in runs)


def test_progress_shows_the_running_task(
    client: WebUIClient, sim: SimulatorProcess, wait_for: Waiter
) -> None:
    sim.set_step_seconds(0.01)
    running = _txt2img(client, "progress-a", steps=120)
    wait_for(lambda: client.progress()["state"]["sampling_step"] > 0, "sampling to start")
    state = client.progress()
    assert state["state"]["job"] == "txt2img" and state["state"]["sampling_steps"] == 120
    assert 0 < state["progress"] < 1
    task = client.task_progress("progress-a")
    assert task["active"] and not task["completed"] and 0 <= task["progress"] <= 1
    other = client.task_progress("someone-else")
    assert other["active"] is False and other["queued"] is False
    client.interrupt()
    running.join()
    assert client.task_progress("progress-a")["completed"] is True


def test_interrupt_task_interrupts_only_its_own_task(
    client: WebUIClient, sim: SimulatorProcess, wait_for: Waiter
) -> None:
    sim.set_step_seconds(0.02)
    mine = _txt2img(client, "intr-mine", steps=150, n_iter=3)
    wait_for(lambda: client.task_progress("intr-mine")["active"], "intr-mine to run")
    theirs = _txt2img(client, "intr-theirs", steps=3)
    wait_for(lambda: client.task_progress("intr-theirs")["queued"], "intr-theirs to queue")

    assert client.interrupt_task("intr-theirs") is False  # queued, not running: left alone
    assert client.interrupt_task("never-sent") is False
    assert client.task_progress("intr-mine")["active"]
    assert client.interrupt_task("intr-mine") is True

    partial = mine.join()
    assert len(partial.images) == 1, "A1111 returns the images made before the interrupt"
    assert len(theirs.join().images) == 1
    outcomes = {g["force_task_id"]: g["outcome"] for g in sim.stats()["generations"]}
    assert outcomes == {"intr-mine": "interrupted", "intr-theirs": "ok"}


def test_answer_has_the_a1111_shape(sim: SimulatorProcess) -> None:
    body = {"prompt": "shape", "seed": -1, "steps": 3, "batch_size": 2, "width": 64, "height": 64}
    answer = httpx.post(f"{sim.url}/sdapi/v1/txt2img", json=body).json()
    assert set(answer) == {"images", "parameters", "info"}
    assert isinstance(answer["info"], str), "info is a JSON *string* in A1111"
    info = json.loads(answer["info"])
    for key in ("seed", "all_seeds", "subseed", "all_prompts", "infotexts", "sd_model_name"):
        assert key in info
    assert info["seed"] != -1 and info["all_seeds"] == [info["seed"], info["seed"] + 1]
    assert answer["parameters"]["seed"] == -1, "parameters echo the request"
    assert all(base64.b64decode(image)[:4] == b"\x89PNG" for image in answer["images"])


def test_malformed_bodies_get_fastapi_422(sim: SimulatorProcess) -> None:
    bad = httpx.post(f"{sim.url}/sdapi/v1/txt2img", json={"prompt": "p", "steps": "x"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "steps"]
    not_json = httpx.post(
        f"{sim.url}/sdapi/v1/txt2img",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert not_json.status_code == 422 and isinstance(not_json.json()["detail"], list)
    no_init = httpx.post(f"{sim.url}/sdapi/v1/img2img", json={"prompt": "p"})
    assert no_init.status_code == 404 and no_init.json()["detail"] == "Init image not found"


def test_unknown_fields_are_accepted_and_reported(sim: SimulatorProcess) -> None:
    body = {"prompt": "p", "steps": 1, "width": 64, "height": 64, "sampler": "Euler", "cfg": 5}
    assert httpx.post(f"{sim.url}/sdapi/v1/txt2img", json=body).status_code == 200
    stats = sim.stats()
    assert stats["generations"][0]["unknown_fields"] == ["cfg", "sampler"]
    assert stats["counts"]["unknown_field_requests"] == 1


def test_override_settings_pin_the_checkpoint_without_post_options(
    client: WebUIClient, sim: SimulatorProcess
) -> None:
    models = client.sd_models()
    wanted = models[1]
    base = {"prompt": "p", "steps": 1, "width": 64, "height": 64}
    pinned = client.txt2img(
        {**base, "override_settings": {"sd_model_checkpoint": wanted["model_name"]}}
    )
    assert pinned.info["sd_model_name"] == wanted["model_name"]
    assert f"Model: {wanted['model_name']}" in pinned.infotexts[0]
    missing = client.txt2img({**base, "override_settings": {"sd_model_checkpoint": "nope"}})
    assert missing.info["sd_model_name"] == models[0]["model_name"], "A1111 falls back"
    stats = sim.stats()
    assert stats["generations"][1].get("model_fallback") is True
    assert stats["counts"]["options_posts"] == 0
    options = httpx.get(f"{sim.url}/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == models[0]["title"]


def test_options_post_is_accepted_and_counted(sim: SimulatorProcess) -> None:
    assert httpx.post(f"{sim.url}/sdapi/v1/options", json={"sd_vae": "None"}).status_code == 200
    assert httpx.get(f"{sim.url}/sdapi/v1/options").json()["sd_vae"] == "None"
    assert sim.stats()["counts"]["options_posts"] == 1
    httpx.post(f"{sim.url}/sdapi/v1/options", json={"sd_vae": "Automatic"})


def test_fault_routes_and_clearing(client: WebUIClient, sim: SimulatorProcess) -> None:
    base = {"prompt": "p", "steps": 1, "width": 64, "height": 64}
    sim.inject("500", 2, routes=["extra-single-image"])
    assert client.txt2img(base).images
    assert len(sim.stats()["faults"]) == 1
    sim.clear_faults()
    assert sim.stats()["faults"] == []
    assert client.txt2img(base).images
    bad = httpx.post(f"{sim.url}/sim/faults", json={"kind": "explode", "count": 1})
    assert bad.status_code == 422


def test_faults_given_at_start_and_stop_kills_the_process() -> None:
    with SimulatorProcess(step_seconds=0.001, faults=["500:1"]) as sim:
        with WebUIClient(sim.url) as client:
            with pytest.raises(WebUIGenerationError):
                client.txt2img({"prompt": "p", "steps": 1})
            assert client.txt2img({"prompt": "p", "steps": 1, "width": 64, "height": 64}).images
        url = sim.url
        assert sim.running
    assert not sim.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/sim/stats")


def test_reset_and_config(sim: SimulatorProcess) -> None:
    httpx.post(f"{sim.url}/sdapi/v1/txt2img", json={"prompt": "p", "steps": 1, "width": 64})
    assert sim.stats()["counts"]["requests"] == 1
    sim.reset()
    assert sim.stats()["counts"]["requests"] == 0
    sim.set_step_seconds(0.002)
    assert httpx.get(f"{sim.url}/sim/config").json() == {"step_seconds": 0.002}
    assert httpx.post(f"{sim.url}/sdapi/v1/skip").json() == {}
