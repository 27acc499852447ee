"""Retention: prune removes ended jobs older than a cutoff, with their images, and nothing else."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from support import start_isolated_server

from stablenew_core import JobHistoryStore, JobService, PipelineConfig, PipelineController

CONFIG = PipelineConfig(prompt="an old photograph", steps=2, width=64, height=64)


def test_prune_deletes_old_ended_jobs_and_their_images(tmp_path: Path, webui: Any) -> None:
    server = start_isolated_server(tmp_path / "home")
    try:
        settings = server.settings.model_copy(
            update={"webui_url": webui.url, "output_dir": tmp_path / "out"}
        )
        service = JobService(settings)
        controller = PipelineController(service)
        old = [controller.run(CONFIG)[0] for _ in range(3)]
        time.sleep(1.5)
        recent = controller.run(CONFIG)[0]
        waiting = controller.submit(
            [
                controller.build_job(
                    CONFIG, run_mode="queue", source="add_to_queue", prompt_source="manual"
                )
            ]
        )[0]
        folders = [Path(r.outputs[0]).parent for r in old]
        assert all(folder.is_dir() for folder in folders)

        # a cutoff between the old jobs and the recent one
        age = datetime.now(UTC) - (recent.created_at - timedelta(seconds=0.7))
        preview = service.prune(age, dry_run=True)
        assert (preview.jobs, preview.folders) == (3, 3)
        assert all(folder.is_dir() for folder in folders)

        report = service.prune(age + timedelta(seconds=0.2))
        assert (report.jobs, report.folders) == (3, 3)
        assert not any(folder.exists() for folder in folders)
        history = JobHistoryStore(settings)
        remaining = {r.job_id for r in history.list(limit=100)}
        assert remaining == {recent.job_id, waiting.job_id}
        assert Path(recent.outputs[0]).exists()
        assert service.prune(timedelta(days=90)).jobs == 0
    finally:
        server.stop()
