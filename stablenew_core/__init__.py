"""stablenew_core: a Prefect-native orchestrator for Stable Diffusion WebUI pipelines.

Run a pipeline now (``direct``) or through a single-GPU queue (``queue``); either way the job
lands in one history, Prefect's own run records, with where it came from and the exact config
it ran with.

The domain names (models, errors, settings) import without Prefect; the orchestration names
(``PipelineController``, ``JobService``, ``SingleNodeJobRunner``, ``JobHistoryStore``) import
Prefect on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import (
    ADetailerConfig,
    HiresConfig,
    Img2ImgConfig,
    PipelineConfig,
    UpscaleConfig,
    redact,
)
from .errors import (
    ConfigError,
    DeploymentMissingError,
    JobCancelledError,
    JobNotFoundError,
    JobStateError,
    PackError,
    RunModeError,
    ServerError,
    StablenewError,
    WebUIAuthError,
    WebUIError,
    WebUIGenerationError,
    WebUIOutOfMemoryError,
    WebUIProtocolError,
    WebUIRejectedError,
    WebUITimeoutError,
    WebUIUnreachableError,
)
from .jobs import (
    Job,
    JobRecord,
    JobResult,
    JobSource,
    JobStatus,
    Priority,
    PromptSource,
    RunMode,
    job_tags,
    normalize_run_mode,
)
from .settings import Settings, get_settings

if TYPE_CHECKING:
    from .controller import PipelineController, PipelineState
    from .history import JobHistoryStore
    from .runner import SingleNodeJobRunner
    from .service import JobService

_LAZY = {
    "PipelineController": "controller",
    "PipelineState": "controller",
    "JobService": "service",
    "SingleNodeJobRunner": "runner",
    "JobHistoryStore": "history",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stablenew_core' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "ADetailerConfig",
    "ConfigError",
    "DeploymentMissingError",
    "HiresConfig",
    "Img2ImgConfig",
    "Job",
    "JobCancelledError",
    "JobHistoryStore",
    "JobNotFoundError",
    "JobRecord",
    "JobResult",
    "JobService",
    "JobSource",
    "JobStateError",
    "JobStatus",
    "PackError",
    "PipelineConfig",
    "PipelineController",
    "PipelineState",
    "Priority",
    "PromptSource",
    "RunMode",
    "RunModeError",
    "ServerError",
    "Settings",
    "SingleNodeJobRunner",
    "StablenewError",
    "UpscaleConfig",
    "WebUIAuthError",
    "WebUIError",
    "WebUIGenerationError",
    "WebUIOutOfMemoryError",
    "WebUIProtocolError",
    "WebUIRejectedError",
    "WebUITimeoutError",
    "WebUIUnreachableError",
    "get_settings",
    "job_tags",
    "normalize_run_mode",
    "redact",
]
