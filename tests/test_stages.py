"""stages: payloads per stage, and each stage and the full chain against the simulator.

The simulator is a real child process on a free 127.0.0.1 port, started and stopped by this
module's fixture; every request body is checked against A1111's field names on both sides.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from stablenew_core.config import PipelineConfig
from stablenew_core.errors import JobCancelledError, WebUIGenerationError
from stablenew_core.jobs import Job
from stablenew_core.outputs import (
    job_output_dir,
    read_manifest,
    read_png_text,
    write_manifest,
)
from stablenew_core.stages import (
    ADETAILER_IMG2IMG_DENOISING,
    StageImage,
    StageName,
    StageResult,
    build_payload,
    planned_stages,
    run_stage,
)
from stablenew_core.webui.client import (
    ADETAILER_UNIT_FIELDS,
    EXTRAS_SINGLE_IMAGE_PATH,
    IMG2IMG_PATH,
    TXT2IMG_PATH,
    WebUIClient,
    check_payload,
)
from stablenew_core.webui.process import SimulatorProcess

FAST_STEP = 0.001


@pytest.fixture(scope="module")
def sim_module() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(step_seconds=FAST_STEP, seed=99) as sim:
        yield sim


@pytest.fixture
def sim(sim_module: SimulatorProcess) -> Iterator[SimulatorProcess]:
    sim_module.clear_faults()
    sim_module.set_step_seconds(FAST_STEP)
    sim_module.reset()
    yield sim_module
    sim_module.clear_faults()
    sim_module.set_step_seconds(FAST_STEP)


@pytest.fixture
def client(sim: SimulatorProcess) -> Iterator[WebUIClient]:
    with WebUIClient(sim.url, read_timeout=60.0) as webui:
        yield webui


def _job(**config: Any) -> Job:
    base: dict[str, Any] = {"prompt": "a red fox, in snow", "steps": 4, "width": 64, "height": 64}
    base.update(config)
    return Job(config=PipelineConfig(**base), run_mode="direct", source="run")


def _wait_for(predicate: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


def _assert_files_match(result: StageResult) -> None:
    for image in result.images:
        path = Path(image.path)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == image.sha256
        with Image.open(path) as png:
            assert png.size == (image.width, image.height)
        texts = read_png_text(path)
        assert texts["parameters"]
        meta = json.loads(texts["stablenew"])
        assert meta["stage"] == result.stage.value and meta["index"] == image.index


def _assert_clean(sim: SimulatorProcess) -> list[dict[str, Any]]:
    generations: list[dict[str, Any]] = sim.stats()["generations"]
    assert [g["unknown_fields"] for g in generations] == [[] for _ in generations]
    return generations


# ---------------------------------------------------------------------------------------------
# Planning and payloads (no network)
# ---------------------------------------------------------------------------------------------


def test_planned_stages_follow_the_enabled_sections() -> None:
    assert planned_stages(_job().config) == [StageName.TXT2IMG]
    config = _job(
        img2img={"enabled": True}, adetailer={"enabled": True}, upscale={"enabled": True}
    ).config
    assert planned_stages(config) == [
        StageName.TXT2IMG,
        StageName.IMG2IMG,
        StageName.ADETAILER,
        StageName.UPSCALE,
    ]
    assert planned_stages(_job(upscale={"enabled": True}).config) == [
        StageName.TXT2IMG,
        StageName.UPSCALE,
    ]


def test_txt2img_payload_pins_model_per_request_with_a1111_names_only() -> None:
    job = _job(model="sim-xl-base-1.0", vae="v.safetensors", clip_skip=2, seed=5, batch_size=2)
    payload = build_payload(StageName.TXT2IMG, job, None, task_id="t-0")
    check_payload(TXT2IMG_PATH, payload)
    assert payload["override_settings"] == {
        "sd_model_checkpoint": "sim-xl-base-1.0",
        "sd_vae": "v.safetensors",
        "CLIP_stop_at_last_layers": 2,
    }
    assert payload["force_task_id"] == "t-0" and payload["seed"] == 5
    assert payload["batch_size"] == 2 and payload["n_iter"] == 1
    assert "enable_hr" not in payload and "sd_model_checkpoint" not in payload
    hires = build_payload(
        StageName.TXT2IMG, _job(hires={"enabled": True, "scale": 1.5}), None, task_id="t"
    )
    check_payload(TXT2IMG_PATH, hires)
    assert hires["enable_hr"] is True and hires["hr_scale"] == 1.5
    assert (
        "sd_model_checkpoint"
        not in build_payload(StageName.TXT2IMG, _job(), None, task_id="t")["override_settings"]
    )


def _previous(tmp_path: Path, width: int = 64, height: int = 48) -> StageResult:
    path = tmp_path / "txt2img_0.png"
    Image.new("RGB", (width, height), (1, 2, 3)).save(path)
    now = datetime.now(UTC)
    return StageResult(
        stage=StageName.TXT2IMG,
        images=[
            StageImage(index=0, path=str(path), sha256="x", seed=1234, width=width, height=height)
        ],
        seeds=[1234],
        info={},
        infotexts=[],
        task_ids=["t"],
        started_at=now,
        finished_at=now,
    )


def test_payloads_of_the_image_stages(tmp_path: Path) -> None:
    previous = _previous(tmp_path)
    init = base64.b64encode((tmp_path / "txt2img_0.png").read_bytes()).decode()
    job = _job(
        img2img={"enabled": True, "denoising_strength": 0.3, "prompt": "other", "steps": 9},
        adetailer={"enabled": True, "steps": 12, "sampler": "Euler"},
        upscale={"enabled": True, "factor": 1.5, "mode": "img2img"},
    )
    img2img = build_payload(StageName.IMG2IMG, job, previous, task_id="i", image_index=0)
    check_payload(IMG2IMG_PATH, img2img)
    assert img2img["init_images"] == [init] and img2img["seed"] == 1234
    assert img2img["prompt"] == "other" and img2img["steps"] == 9
    assert (img2img["width"], img2img["height"], img2img["denoising_strength"]) == (64, 48, 0.3)

    adetailer = build_payload(StageName.ADETAILER, job, previous, task_id="a", image_index=0)
    check_payload(IMG2IMG_PATH, adetailer)
    assert adetailer["denoising_strength"] == ADETAILER_IMG2IMG_DENOISING
    [unit] = adetailer["alwayson_scripts"]["ADetailer"]["args"]
    assert set(unit) <= ADETAILER_UNIT_FIELDS
    assert unit["ad_model"] == "face_yolov8n.pt" and unit["ad_use_steps"] is True
    assert unit["ad_steps"] == 12 and unit["ad_sampler"] == "Euler"

    upscale = build_payload(StageName.UPSCALE, job, previous, task_id="u", image_index=0)
    check_payload(IMG2IMG_PATH, upscale)
    assert (upscale["width"], upscale["height"]) == (96, 72)

    extras_job = _job(upscale={"enabled": True, "factor": 2, "upscaler": "Lanczos"})
    extras = build_payload(StageName.UPSCALE, extras_job, previous, task_id="u", image_index=0)
    check_payload(EXTRAS_SINGLE_IMAGE_PATH, extras)
    assert extras["image"] == init and extras["upscaling_resize"] == 2
    assert extras["resize_mode"] == 0 and extras["upscaler_1"] == "Lanczos"
    assert "force_task_id" not in extras

    with pytest.raises(ValueError, match="image_index"):
        build_payload(StageName.IMG2IMG, job, previous, task_id="i")
    with pytest.raises(ValueError, match="no image with index 5"):
        build_payload(StageName.IMG2IMG, job, previous, task_id="i", image_index=5)


# ---------------------------------------------------------------------------------------------
# Against the simulator
# ---------------------------------------------------------------------------------------------


def test_txt2img_stage_writes_the_batch_with_real_seeds(
    client: WebUIClient, sim: SimulatorProcess, tmp_path: Path
) -> None:
    job = _job(batch_size=2, n_iter=2, seed=-1)
    progress: list[tuple[float, str]] = []
    result = run_stage(
        client,
        job,
        StageName.TXT2IMG,
        None,
        tmp_path,
        on_progress=lambda fraction, text: progress.append((fraction, text)),
        poll_seconds=0.01,
    )
    assert [image.index for image in result.images] == [0, 1, 2, 3]
    assert [Path(image.path).name for image in result.images] == [
        f"txt2img_{i}.png" for i in range(4)
    ]
    assert -1 not in result.seeds and len(result.seeds) == 4
    assert result.seeds == [result.seeds[0] + i for i in range(4)]
    assert [image.seed for image in result.images] == result.seeds
    assert result.info["seed"] == result.seeds[0] and len(result.infotexts) == 4
    assert result.task_ids == [f"{job.job_id}-txt2img-0"]
    assert progress and progress[-1][0] == 1.0
    assert all(0.0 <= fraction <= 1.0 for fraction, _ in progress)
    _assert_files_match(result)
    [generation] = _assert_clean(sim)
    assert generation["force_task_id"] == f"{job.job_id}-txt2img-0"
    assert generation["seed"] == result.seeds[0]


def test_the_four_stage_chain_and_its_manifest(
    client: WebUIClient, sim: SimulatorProcess, tmp_path: Path
) -> None:
    job = _job(
        batch_size=2,
        model="sim-anime-v3",
        img2img={"enabled": True},
        adetailer={"enabled": True},
        upscale={"enabled": True, "factor": 2},
    )
    job_dir = job_output_dir(tmp_path, job)
    results: list[StageResult] = []
    previous: StageResult | None = None
    for stage in planned_stages(job.config):
        previous = run_stage(client, job, stage, previous, job_dir, poll_seconds=0.01)
        results.append(previous)
        _assert_files_match(previous)
    txt2img, img2img, adetailer, upscale = results
    assert txt2img.seeds == img2img.seeds == adetailer.seeds == upscale.seeds
    assert [(i.width, i.height) for i in adetailer.images] == [(64, 64), (64, 64)]
    assert [(i.width, i.height) for i in upscale.images] == [(128, 128), (128, 128)]
    assert "ADetailer model: face_yolov8n.pt" in adetailer.infotexts[0]
    assert len(img2img.info["per_image"]) == 2

    generations = _assert_clean(sim)
    assert [g["route"] for g in generations] == [
        "txt2img",
        "img2img",
        "img2img",
        "img2img",
        "img2img",
        "extra-single-image",
        "extra-single-image",
    ]
    assert [g["force_task_id"] for g in generations[:3]] == [
        f"{job.job_id}-txt2img-0",
        f"{job.job_id}-img2img-0",
        f"{job.job_id}-img2img-1",
    ]
    assert all(g["model"].startswith("sim-anime-v3") for g in generations[:5])
    assert sim.stats()["counts"]["options_posts"] == 0, "the model is never set by POST /options"

    write_manifest(job, results, job_dir)
    manifest = read_manifest(job_dir)
    assert [stage["name"] for stage in manifest["stages"]] == [
        "txt2img",
        "img2img",
        "adetailer",
        "upscale",
    ]
    for stage in manifest["stages"]:
        for entry in stage["files"]:
            data = (job_dir / entry["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    expected = [
        f"{stage}_{i}.png"
        for stage in ("txt2img", "img2img", "adetailer", "upscale")
        for i in (0, 1)
    ]
    assert sorted(p.name for p in job_dir.iterdir()) == sorted([*expected, "manifest.json"])


def test_upscale_by_img2img_rounds_to_multiples_of_8(
    client: WebUIClient, sim: SimulatorProcess, tmp_path: Path
) -> None:
    job = _job(width=72, height=64, upscale={"enabled": True, "mode": "img2img", "factor": 1.5})
    first = run_stage(client, job, StageName.TXT2IMG, None, tmp_path)
    result = run_stage(client, job, StageName.UPSCALE, first, tmp_path)
    assert [(i.width, i.height) for i in result.images] == [(112, 96)]  # 108 -> 112
    assert [g["route"] for g in _assert_clean(sim)] == ["txt2img", "img2img"]


def test_errors_carry_the_stage(client: WebUIClient, sim: SimulatorProcess, tmp_path: Path) -> None:
    job = _job(img2img={"enabled": True})
    first = run_stage(client, job, StageName.TXT2IMG, None, tmp_path)
    sim.inject("500", 1, routes=["img2img"])
    with pytest.raises(WebUIGenerationError) as caught:
        run_stage(client, job, StageName.IMG2IMG, first, tmp_path)
    assert caught.value.stage == "img2img" and "stage img2img" in str(caught.value)


def test_should_stop_before_a_request_sends_nothing(
    client: WebUIClient, sim: SimulatorProcess, tmp_path: Path
) -> None:
    with pytest.raises(JobCancelledError):
        run_stage(client, _job(), StageName.TXT2IMG, None, tmp_path, should_stop=lambda: True)
    assert sim.stats()["generations"] == []


def test_should_stop_interrupts_our_own_running_task(
    client: WebUIClient, sim: SimulatorProcess, tmp_path: Path
) -> None:
    sim.set_step_seconds(0.02)
    job = _job(steps=150, n_iter=3)
    stop = threading.Event()

    def on_progress(fraction: float, text: str) -> None:
        if fraction > 0:
            stop.set()

    with pytest.raises(JobCancelledError, match="interrupted"):
        run_stage(
            client,
            job,
            StageName.TXT2IMG,
            None,
            tmp_path,
            on_progress=on_progress,
            should_stop=stop.is_set,
            poll_seconds=0.01,
        )
    [generation] = sim.stats()["generations"]
    assert generation["outcome"] == "interrupted"


def test_should_stop_never_interrupts_another_task(
    client: WebUIClient, sim: SimulatorProcess, tmp_path: Path
) -> None:
    sim.set_step_seconds(0.01)
    other: dict[str, Any] = {}
    foreign_payload = {
        "prompt": "someone else's job",
        "steps": 100,
        "width": 64,
        "height": 64,
        "force_task_id": "foreign-task",
    }

    def foreign() -> None:
        other["result"] = client.txt2img(foreign_payload)

    thread = threading.Thread(target=foreign, daemon=True)
    thread.start()
    _wait_for(lambda: client.task_progress("foreign-task")["active"], "the foreign task to run")

    stop = threading.Event()

    def on_progress(fraction: float, text: str) -> None:
        if "waiting" in text:  # our request is queued behind the foreign one
            stop.set()

    job = _job(steps=150)
    with pytest.raises(JobCancelledError):
        run_stage(
            client,
            job,
            StageName.TXT2IMG,
            None,
            tmp_path,
            on_progress=on_progress,
            should_stop=stop.is_set,
            poll_seconds=0.01,
        )
    thread.join(60)
    outcomes = {g["force_task_id"]: g["outcome"] for g in sim.stats()["generations"]}
    assert outcomes == {"foreign-task": "ok", f"{job.job_id}-txt2img-0": "interrupted"}
    assert len(other["result"].images) == 1


def test_infotext_of_extras_output_comes_from_the_png(
    client: WebUIClient, sim: SimulatorProcess, tmp_path: Path
) -> None:
    job = _job(upscale={"enabled": True})
    first = run_stage(client, job, StageName.TXT2IMG, None, tmp_path)
    result = run_stage(client, job, StageName.UPSCALE, first, tmp_path)
    assert result.infotexts == first.infotexts
    assert result.info == {"per_image": [{}]}
    with Image.open(io.BytesIO(Path(result.images[0].path).read_bytes())) as image:
        assert image.size == (128, 128)
