"""The whole chain through Prefect: txt2img -> img2img -> ADetailer -> upscale, direct and queued,
with the outputs, PNG text chunks and manifest where the README says."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from PIL import Image
from support import generations_for, wait_terminal

from stablenew_core import PipelineConfig, PipelineController, Settings
from stablenew_core.outputs import read_png_text

FOUR = PipelineConfig.model_validate(
    {
        "prompt": "a knight in a misty forest",
        "steps": 4,
        "width": 64,
        "height": 64,
        "batch_size": 2,
        "seed": -1,
        "img2img": {"enabled": True},
        "adetailer": {"enabled": True},
        "upscale": {"enabled": True, "factor": 2.0},
    }
)


def check_outputs(settings: Settings, record: Any, webui: Any) -> None:
    assert record.status == "completed", record.error
    job_dir = settings.outputs / record.created_at.strftime("%Y-%m-%d") / record.job_id
    assert [Path(p).parent for p in record.outputs] == [job_dir, job_dir]
    assert sorted(p.name for p in job_dir.glob("*.png")) == sorted(
        f"{stage}_{i}.png"
        for stage in ("txt2img", "img2img", "adetailer", "upscale")
        for i in (0, 1)
    )
    for path in record.outputs:
        with Image.open(path) as image:
            assert image.size == (128, 128)
        chunks = read_png_text(Path(path))
        assert "Steps:" in chunks["parameters"]
        meta = json.loads(chunks["stablenew"])
        assert (meta["job_id"], meta["run_mode"]) == (record.job_id, record.run_mode)
    manifest = json.loads((job_dir / "manifest.json").read_text())
    assert [stage["name"] for stage in manifest["stages"]] == [
        "txt2img",
        "img2img",
        "adetailer",
        "upscale",
    ]
    for stage in manifest["stages"]:
        for entry in stage["files"]:
            data = (job_dir / Path(entry["path"]).name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    seeds = manifest["stages"][0]["seeds"]
    assert len(seeds) == 2 and all(seed >= 0 for seed in seeds), "-1 replaced by the real seed"
    # extras requests carry no task id in A1111's protocol; the upscaled files show them
    routes = [g["route"] for g in generations_for(webui, record.job_id)]
    assert routes == ["txt2img", "img2img", "img2img", "img2img", "img2img"]


def test_four_stage_job_direct_and_queued(
    settings: Settings, webui: Any, start_worker: Any
) -> None:
    controller = PipelineController(settings=settings)
    (direct,) = controller.run(FOUR)
    check_outputs(settings, direct, webui)

    job = controller.build_job(
        FOUR, run_mode="queue", source="add_to_queue", prompt_source="manual"
    )
    controller.submit([job])
    start_worker()
    check_outputs(settings, wait_terminal(settings, job.job_id), webui)
