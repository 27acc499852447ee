"""Jobs: what is submitted (Job), what history shows (JobRecord), and their vocabulary.

``RunMode``, ``JobSource``, ``PromptSource``, ``Priority`` and ``JobStatus`` are closed sets of
strings. :func:`normalize_run_mode` is the one place that turns a user's run mode into a valid
one, and :func:`job_tags` the one place that names a job's tags. No Prefect import here.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .config import PipelineConfig, redact

logger = logging.getLogger("stablenew_core")

RunMode = Literal["direct", "queue"]
JobSource = Literal["run", "run_now", "add_to_queue", "system", "unknown"]
PromptSource = Literal["manual", "pack"]
Priority = Literal["high", "normal", "low"]
JobStatus = Literal["queued", "running", "completed", "failed", "cancelled", "crashed"]

RUN_MODES: tuple[str, ...] = get_args(RunMode)
JOB_SOURCES: tuple[str, ...] = get_args(JobSource)
PROMPT_SOURCES: tuple[str, ...] = get_args(PromptSource)
PRIORITIES: tuple[str, ...] = get_args(Priority)
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled", "crashed"})

TAG_ROOT = "stablenew"
OUTPUTS_ARTIFACT_PREFIX = "stablenew-outputs-"
PROGRESS_ARTIFACT_PREFIX = "stablenew-progress-"


def new_job_id() -> str:
    """A fresh job id: 32 lowercase hex digits."""
    return uuid.uuid4().hex


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def normalize_run_mode(value: object) -> RunMode:
    """The seed's rule: None or "" -> queue; any case; anything else -> queue, with a warning."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "queue"
    text = str(value).strip().lower()
    if text == "direct":
        return "direct"
    if text == "queue":
        return "queue"
    logger.warning("unknown run_mode %r: falling back to 'queue'", value)
    return "queue"


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


class Job(BaseModel):
    """One unit of work: a config, how to run it, and where it came from."""

    model_config = ConfigDict(extra="ignore", frozen=False)

    job_id: str = Field(default_factory=new_job_id, min_length=1, max_length=64)
    created_at: datetime = Field(default_factory=utc_now)
    config: PipelineConfig
    run_mode: RunMode = "queue"
    source: JobSource = "unknown"
    prompt_source: PromptSource = "manual"
    prompt_pack_id: str | None = Field(default=None, max_length=200)
    config_snapshot: dict[str, Any] | None = None
    priority: Priority = "normal"
    retried_from: str | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    worker: str | None = Field(
        default=None, min_length=1, max_length=100, description="Run only on this named worker."
    )

    @field_validator("job_id")
    @classmethod
    def _job_id_chars(cls, value: str) -> str:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
        if not set(value) <= allowed:
            raise ValueError(f"may hold only letters, digits, '-' and '_', got {value!r}")
        return value

    @field_validator("run_mode", "source", "prompt_source", "priority", mode="before")
    @classmethod
    def _case_insensitive(cls, value: object) -> object:
        return _lower(value)

    @field_validator("config_snapshot")
    @classmethod
    def _plain_json(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """The snapshot is recorded as JSON in Prefect: it must survive the round trip."""
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be plain JSON (finite numbers): {exc}") from exc
        return value

    @field_validator("created_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def tags(self) -> list[str]:
        """This job's Prefect tags (see :func:`job_tags`)."""
        return job_tags(self)


def job_tags(job: Job) -> list[str]:
    """The tags of a job's flow and task runs: the one place that names them."""
    tags = [
        TAG_ROOT,
        f"run_mode:{job.run_mode}",
        f"source:{job.source}",
        f"prompt_source:{job.prompt_source}",
        f"job:{job.job_id}",
    ]
    if job.prompt_pack_id:
        tags.append(f"pack:{job.prompt_pack_id}")
    if job.retried_from:
        tags.append(f"retried_from:{job.retried_from}")
    if job.idempotency_key:
        tags.append(f"key:{job.idempotency_key}")
    if job.worker:
        tags.append(f"worker:{job.worker}")
    return tags


def make_job(
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
    job_id: str | None = None,
    created_at: datetime | None = None,
) -> Job:
    """A job with every field filled: the one function that builds jobs.

    ``run_mode`` is normalised (:func:`normalize_run_mode`); ``config_snapshot`` is the
    config's dict with secrets removed; a pack id is kept only for ``prompt_source="pack"``.
    :meth:`PipelineController.build_job` calls this with its id factory and clock.
    """
    return Job(
        job_id=job_id or new_job_id(),
        created_at=created_at or utc_now(),
        config=config,
        run_mode=normalize_run_mode(run_mode),
        source=source,
        prompt_source=prompt_source,
        prompt_pack_id=prompt_pack_id if prompt_source == "pack" else None,
        config_snapshot=redact(config.to_dict()),
        priority=priority,
        retried_from=retried_from,
        idempotency_key=idempotency_key,
        worker=worker,
    )


def artifact_slug(job_id: str) -> str:
    """``job_id`` as Prefect accepts in artifact keys (lowercase letters, digits, dashes)."""
    return "".join(ch if ch.isalnum() else "-" for ch in job_id.lower())


def outputs_artifact_key(job_id: str) -> str:
    """The key of the table artifact listing a job's images."""
    return f"{OUTPUTS_ARTIFACT_PREFIX}{artifact_slug(job_id)}"


def progress_artifact_key(job_id: str) -> str:
    """The key of the progress artifact of a job."""
    return f"{PROGRESS_ARTIFACT_PREFIX}{artifact_slug(job_id)}"


class JobResult(BaseModel):
    """What a finished job returns: its images and manifest."""

    job_id: str
    outputs: list[str] = Field(default_factory=list)
    manifest_path: str | None = None
    seeds: list[int] = Field(default_factory=list)


class JobRecord(BaseModel):
    """A job as history shows it, read back from Prefect's run records."""

    job_id: str
    run_mode: RunMode
    source: JobSource
    prompt_source: PromptSource
    prompt_pack_id: str | None = None
    config_snapshot: dict[str, Any] | None = None
    status: JobStatus
    state_name: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    outputs: list[str] = Field(default_factory=list)
    flow_run_id: str | None = None
    priority: Priority = "normal"
    retried_from: str | None = None

    @property
    def is_terminal(self) -> bool:
        """True once the job will not change any more."""
        return self.status in TERMINAL_STATUSES
