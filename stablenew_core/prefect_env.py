"""How every part of stablenew_core talks to Prefect: one place for Prefect's settings.

:func:`process_env` is the environment of every process the project launches (server, worker,
benchmarks): telemetry off, Prefect's home and result storage under ``STABLENEW_HOME``, the API
URL and key. :func:`prefect_settings` applies the same to the calling process for the duration
of a ``with`` block, so library calls work whatever the process was started with.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .settings import Settings

TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
# Never start Prefect's ephemeral server behind the user's back (it timed out here).
NO_EPHEMERAL = {"PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false"}


def disable_telemetry() -> None:
    """Turn Prefect's telemetry off in this process (read at call time by Prefect)."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def _client_values(settings: Settings) -> dict[str, str]:
    values = {
        "PREFECT_HOME": str(settings.prefect_home),
        "PREFECT_API_URL": settings.api_url(),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(settings.home / "results"),
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
    if settings.prefect_api_key is not None:
        values["PREFECT_API_KEY"] = settings.prefect_api_key.get_secret_value()
    return values


def process_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: ``base`` (default: ours) plus Prefect's settings."""
    env = dict(os.environ if base is None else base)
    env.update(TELEMETRY_OFF)
    env.update(NO_EPHEMERAL)
    env.update(_client_values(settings))
    return env


def configure_process(settings: Settings) -> None:
    """Make ``settings`` Prefect's process-wide defaults, if Prefect is not imported yet.

    Prefect reads its settings once, at import; background threads (log and event shipping,
    heartbeats) use those process-wide ones. Setting them before the import keeps every thread
    on the same server.
    """
    disable_telemetry()
    if "prefect" in sys.modules:
        return
    for key, value in {**NO_EPHEMERAL, **_client_values(settings)}.items():
        os.environ.setdefault(key, value)


@contextmanager
def prefect_settings(settings: Settings) -> Iterator[None]:
    """Apply ``settings`` to Prefect inside this process for the block."""
    configure_process(settings)
    from prefect.settings import (
        PREFECT_API_KEY,
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    values = _client_values(settings)
    updates: dict[Any, Any] = {
        PREFECT_HOME: values["PREFECT_HOME"],
        PREFECT_API_URL: values["PREFECT_API_URL"],
        PREFECT_RESULTS_LOCAL_STORAGE_PATH: values["PREFECT_RESULTS_LOCAL_STORAGE_PATH"],
    }
    if "PREFECT_API_KEY" in values:
        updates[PREFECT_API_KEY] = values["PREFECT_API_KEY"]
    with temporary_settings(updates=updates):
        yield
