"""outputs: layout, PNG text chunks, atomic writes and the manifest."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from stablenew_core.config import PipelineConfig
from stablenew_core.errors import ConfigError
from stablenew_core.jobs import Job
from stablenew_core.outputs import (
    job_output_dir,
    read_manifest,
    read_png_text,
    stablenew_metadata,
    write_manifest,
    write_png,
)
from stablenew_core.stages import StageImage, StageName, StageResult


def _png(width: int = 32, height: int = 24, **texts: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _job(**changes: object) -> Job:
    fields: dict[str, object] = {
        "config": PipelineConfig(prompt="a/../../etc passwd, 猫"),
        "run_mode": "direct",
        "source": "run",
    }
    fields.update(changes)
    return Job.model_validate(fields)


def test_job_output_dir_is_utc_day_then_job_id(tmp_path: Path) -> None:
    late_evening_east = datetime(2026, 3, 1, 1, 30, tzinfo=timezone(timedelta(hours=3)))
    job = _job(job_id="job-1", created_at=late_evening_east)
    assert job_output_dir(tmp_path, job) == tmp_path / "2026-02-28" / "job-1"
    assert "passwd" not in str(job_output_dir(tmp_path, job))


def test_job_output_dir_refuses_an_unsafe_job_id(tmp_path: Path) -> None:
    job = _job()
    job.job_id = "../escape"  # assignment is not validated by the model
    with pytest.raises(ConfigError, match="job_id"):
        job_output_dir(tmp_path, job)


def test_write_png_sets_both_chunks_and_returns_hash_and_size(tmp_path: Path) -> None:
    job = _job()
    meta = stablenew_metadata(job, "txt2img", 3)
    assert meta == {
        "job_id": job.job_id,
        "run_mode": "direct",
        "source": "run",
        "config_hash": job.config.config_hash(),
        "stage": "txt2img",
        "index": 3,
    }
    source = _png(parameters="old infotext", Software="sim")
    target = tmp_path / "day" / "job" / "txt2img_3.png"
    sha, width, height = write_png(
        target, source, parameters="猫 prompt\nSteps: 20", stablenew=meta
    )
    assert (width, height) == (32, 24)
    assert sha == hashlib.sha256(target.read_bytes()).hexdigest()
    texts = read_png_text(target)
    assert texts["parameters"] == "猫 prompt\nSteps: 20"
    assert json.loads(texts["stablenew"]) == meta
    assert texts["Software"] == "sim", "other text chunks are kept"
    assert [p.name for p in target.parent.iterdir()] == ["txt2img_3.png"], "no temp file left"


def test_write_png_keeps_the_source_infotext_when_none_is_given(tmp_path: Path) -> None:
    target = tmp_path / "upscale_0.png"
    target.write_bytes(b"an older file")
    write_png(target, _png(parameters="from the webui"), parameters=None, stablenew={"index": 0})
    assert read_png_text(target)["parameters"] == "from the webui"
    with Image.open(target) as image:
        assert image.format == "PNG"


def test_write_png_refuses_what_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_png(tmp_path / "x.png", b"not an image", parameters=None, stablenew={})
    assert list(tmp_path.iterdir()) == []


def test_manifest_lists_files_with_hashes_and_redacts_secrets(tmp_path: Path) -> None:
    job = _job(config_snapshot={"prompt": "p", "webui_password": "hunter2", "nested": {"token": 1}})
    job_dir = job_output_dir(tmp_path, job)
    started = datetime(2026, 1, 1, tzinfo=UTC)
    images = []
    for index in range(2):
        path = job_dir / f"txt2img_{index}.png"
        sha, width, height = write_png(
            path, _png(), parameters=f"text {index}", stablenew={"index": index}
        )
        images.append(
            StageImage(
                index=index, path=str(path), sha256=sha, seed=10 + index, width=width, height=height
            )
        )
    result = StageResult(
        stage=StageName.TXT2IMG,
        images=images,
        seeds=[10, 11],
        info={"seed": 10, "all_seeds": [10, 11]},
        infotexts=["text 0", "text 1"],
        task_ids=[f"{job.job_id}-txt2img-0"],
        started_at=started,
        finished_at=started + timedelta(seconds=1.5),
    )
    path = write_manifest(job, [result], job_dir, extra={"api_key": "k-123", "note": "n"})
    assert path == job_dir / "manifest.json"
    raw = path.read_text()
    assert "hunter2" not in raw and "k-123" not in raw

    manifest = read_manifest(job_dir)
    assert manifest["job"]["job_id"] == job.job_id
    assert manifest["job"]["run_mode"] == "direct" and manifest["job"]["source"] == "run"
    assert manifest["job"]["config_snapshot"]["webui_password"] == "***"
    assert manifest["job"]["config_snapshot"]["nested"]["token"] == "***"
    assert manifest["extra"] == {"api_key": "***", "note": "n"}
    [stage] = manifest["stages"]
    assert stage["name"] == "txt2img" and stage["seconds"] == 1.5
    assert stage["seeds"] == [10, 11] and stage["info"]["all_seeds"] == [10, 11]
    assert stage["infotexts"] == ["text 0", "text 1"]
    for entry in stage["files"]:
        file = job_dir / entry["path"]
        assert entry["path"] == file.name
        assert hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"]


def test_manifest_without_snapshot_uses_the_config(tmp_path: Path) -> None:
    job = _job()
    write_manifest(job, [], tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["job"]["config_snapshot"]["prompt"] == job.config.prompt
    assert manifest["stages"] == [] and "extra" not in manifest
