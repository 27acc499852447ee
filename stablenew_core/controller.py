"""PipelineController: the only place that builds jobs, and the one that enforces run modes.

The three entry paths of the seed spec:

* :meth:`PipelineController.run`: a manual **Run** from the prompt workspace (source ``run``,
  prompt source ``manual``, run mode from the pipeline state, default ``direct``);
* :meth:`PipelineController.run_now`: **Run Now** from pack entries (source ``run_now``, prompt
  source ``pack``, the pack id; run mode from the pipeline state, default ``queue``);
* :meth:`PipelineController.add_to_queue`: **Add to Queue** (source ``add_to_queue``, always
  ``queue``).

:meth:`PipelineController.submit` sends each job where its run mode says: direct to
:meth:`JobService.submit_direct`, queue to :meth:`JobService.submit_queued`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from .config import PipelineConfig
from .jobs import (
    Job,
    JobRecord,
    JobSource,
    Priority,
    PromptSource,
    RunMode,
    make_job,
    new_job_id,
    utc_now,
)
from .service import JobService
from .settings import Settings

if TYPE_CHECKING:
    from .packs import PackEntry


class PipelineState(BaseModel):
    """What the user chose in the pipeline panel that decides how a Run goes."""

    run_mode: str | None = None


class PipelineController:
    """Builds jobs with complete metadata and submits them by run mode."""

    def __init__(
        self,
        service: JobService | None = None,
        *,
        settings: Settings | None = None,
        state: PipelineState | None = None,
        job_id_factory: Callable[[], str] = new_job_id,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.service = service or JobService(settings)
        self.state = state or PipelineState()
        self._job_id_factory = job_id_factory
        self._clock = clock

    def build_job(
        self,
        config: PipelineConfig,
        *,
        run_mode: object,
        source: JobSource,
        prompt_source: PromptSource,
        prompt_pack_id: str | None = None,
        priority: Priority = "normal",
        retried_from: str | None = None,
        idempotency_key: str | None = None,
        worker: str | None = None,
    ) -> Job:
        """A job with every field filled; ``run_mode`` normalised as the seed spec says."""
        return make_job(
            config,
            run_mode=run_mode,
            source=source,
            prompt_source=prompt_source,
            prompt_pack_id=prompt_pack_id,
            priority=priority,
            retried_from=retried_from,
            idempotency_key=idempotency_key,
            worker=worker,
            job_id=self._job_id_factory(),
            created_at=self._clock(),
        )

    def _mode(self, explicit: object, default: RunMode) -> object:
        if explicit is not None:
            return explicit
        if self.state.run_mode:
            return self.state.run_mode
        return default

    # -- the three entry paths ------------------------------------------------------------

    def run(
        self,
        config: PipelineConfig,
        *,
        run_mode: str | None = None,
        priority: Priority = "normal",
    ) -> list[JobRecord]:
        """A manual Run from the prompt workspace (direct unless the pipeline state says)."""
        job = self.build_job(
            config,
            run_mode=self._mode(run_mode, "direct"),
            source="run",
            prompt_source="manual",
            priority=priority,
        )
        return self.submit([job])

    def run_now(
        self,
        entries: Iterable[PackEntry] | str | Path,
        *,
        run_mode: str | None = None,
        priority: Priority = "normal",
        **expand: Any,
    ) -> list[JobRecord]:
        """Run Now from pack entries (a pack path, or entries from :func:`expand_pack`)."""
        jobs = self.pack_jobs(
            entries,
            run_mode=self._mode(run_mode, "queue"),
            source="run_now",
            priority=priority,
            **expand,
        )
        return self.submit(jobs)

    def add_to_queue(
        self,
        entries: Iterable[PackEntry] | str | Path,
        *,
        priority: Priority = "normal",
        **expand: Any,
    ) -> list[JobRecord]:
        """Add to Queue from pack entries: always queue mode."""
        jobs = self.pack_jobs(
            entries, run_mode="queue", source="add_to_queue", priority=priority, **expand
        )
        return self.submit(jobs)

    def pack_jobs(
        self,
        entries: Iterable[PackEntry] | str | Path,
        *,
        run_mode: object,
        source: JobSource,
        priority: Priority = "normal",
        **expand: Any,
    ) -> list[Job]:
        """Jobs for pack entries; a path is loaded and expanded first (all or nothing)."""
        if isinstance(entries, str | Path):
            from .packs import load_and_expand

            entries = load_and_expand(entries, **expand)
        elif expand:
            raise TypeError(f"expansion options {sorted(expand)} need a pack path")
        return [
            self.build_job(
                entry.config,
                run_mode=run_mode,
                source=source,
                prompt_source="pack",
                prompt_pack_id=entry.pack_id,
                priority=priority,
            )
            for entry in entries
        ]

    # -- enforcement ----------------------------------------------------------------------

    def submit(self, jobs: Iterable[Job]) -> list[JobRecord]:
        """Submit each job by its run mode; return their records in order."""
        return [self.service.submit(job) for job in jobs]
