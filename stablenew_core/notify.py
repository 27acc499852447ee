"""Webhook notifications: a job reached a terminal state (completed, failed, crashed, cancelled).

The body is :class:`JobNotification`: the job's id, status, error, outputs and provenance;
never a setting, credential or config snapshot. Delivery is retried with backoff on a
background thread and never raises: a failing webhook never fails a job. The URL's
credentials, if any, never appear in logs.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel

from .jobs import JobRecord
from .settings import Settings

logger = logging.getLogger("stablenew_core.notify")


class JobNotification(BaseModel):
    """What a webhook receives."""

    event: str = "stablenew.job.terminal"
    job_id: str
    status: str
    state_name: str | None = None
    error: str | None = None
    outputs: list[str]
    flow_run_id: str | None = None
    run_mode: str
    source: str
    prompt_source: str
    prompt_pack_id: str | None = None
    retried_from: str | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_record(cls, record: JobRecord) -> JobNotification:
        """The notification for a job's record."""
        return cls(
            job_id=record.job_id,
            status=record.status,
            state_name=record.state_name,
            error=record.error,
            outputs=record.outputs,
            flow_run_id=record.flow_run_id,
            run_mode=record.run_mode,
            source=record.source,
            prompt_source=record.prompt_source,
            prompt_pack_id=record.prompt_pack_id,
            retried_from=record.retried_from,
            finished_at=record.finished_at,
        )


def safe_url(url: str) -> str:
    """``url`` without user info, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def deliver(
    url: str,
    notification: JobNotification,
    *,
    attempts: int = 4,
    backoff_seconds: float = 0.5,
    timeout: float = 10.0,
) -> bool:
    """POST the notification; retry on errors and non-2xx; True once delivered. Never raises."""
    body = notification.model_dump(mode="json")
    for attempt in range(1, attempts + 1):
        try:
            response = httpx.post(url, json=body, timeout=timeout)
            if response.is_success:
                return True
            problem = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            problem = type(exc).__name__
        except Exception as exc:  # a webhook must never take a job down
            problem = type(exc).__name__
        logger.warning(
            "webhook %s for job %s: attempt %d/%d failed (%s)",
            safe_url(url),
            notification.job_id,
            attempt,
            attempts,
            problem,
        )
        if attempt < attempts:
            time.sleep(backoff_seconds * 2 ** (attempt - 1))
    return False


def notify_terminal(
    url: str | None, record: JobRecord, *, attempts: int = 4, backoff_seconds: float = 0.5
) -> threading.Thread | None:
    """Deliver ``record``'s notification on a background thread, if a URL is set."""
    if not url or not record.is_terminal:
        return None
    thread = threading.Thread(
        target=deliver,
        args=(url, JobNotification.from_record(record)),
        kwargs={"attempts": attempts, "backoff_seconds": backoff_seconds},
        name=f"webhook-{record.job_id}",
        daemon=False,  # let the interpreter finish delivering before it exits
    )
    thread.start()
    return thread


def notify_record(settings: Settings, record: JobRecord) -> threading.Thread | None:
    """Tell ``settings.webhook_url`` (if set) that ``record`` reached a terminal state."""
    return notify_terminal(
        settings.webhook_url,
        record,
        attempts=settings.webhook_attempts,
        backoff_seconds=settings.webhook_backoff_seconds,
    )
