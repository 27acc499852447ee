"""Prompt packs end to end: Run Now and Add to Queue build pack jobs, history filters by pack."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from stablenew_core import JobHistoryStore, PackError, PipelineController, Settings


def write_pack(directory: Path, body: str) -> Path:
    path = directory / f"pack_{uuid.uuid4().hex[:8]}.txt"
    path.write_text(body)
    return path


PACK = """\
@seed 11
@preset steps: 3
@preset width: 64
@preset height: 64

a red fox in snow
neg: blurry

a blue heron at dawn
"""


def test_pack_runs_in_both_modes_and_history_filters_by_pack(
    settings: Settings, tmp_path: Path, start_worker: Any
) -> None:
    pack = write_pack(tmp_path, PACK)
    controller = PipelineController(settings=settings)

    direct = controller.run_now(pack, run_mode="direct")
    assert [r.status for r in direct] == ["completed", "completed"]
    assert all(r.source == "run_now" and r.run_mode == "direct" for r in direct)
    assert all(r.prompt_source == "pack" and r.prompt_pack_id == pack.stem for r in direct)
    assert direct[0].config_snapshot and direct[0].config_snapshot["negative_prompt"] == "blurry"

    queued = controller.add_to_queue(pack)
    assert [r.status for r in queued] == ["queued", "queued"]
    assert all(r.source == "add_to_queue" and r.run_mode == "queue" for r in queued)

    start_worker()
    history = JobHistoryStore(settings)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if history.count(prompt_pack_id=pack.stem, status="completed") == 4:
            break
        time.sleep(0.3)
    records = history.list(prompt_pack_id=pack.stem)
    assert len(records) == 4
    assert {r.status for r in records} == {"completed"}
    assert {r.run_mode for r in records} == {"direct", "queue"}
    assert {r.job_id for r in records} == {r.job_id for r in direct + queued}
    assert history.list(prompt_pack_id=pack.stem, run_mode="queue", prompt_source="pack")
    assert all(r.outputs for r in records)


def test_run_now_defaults_to_queue_like_the_seed(settings: Settings, tmp_path: Path) -> None:
    pack = write_pack(tmp_path, "one prompt only\n@preset width: 64\n@preset height: 64\n")
    (record,) = PipelineController(settings=settings).run_now(pack)
    assert record.run_mode == "queue" and record.status == "queued"


def test_malformed_pack_submits_nothing(settings: Settings, tmp_path: Path) -> None:
    pack = write_pack(tmp_path, "a fine prompt\n\na __missing__ wildcard\n")
    with pytest.raises(PackError, match=r"line 3.*missing"):
        PipelineController(settings=settings).add_to_queue(pack)
    assert JobHistoryStore(settings).count(prompt_pack_id=pack.stem) == 0
