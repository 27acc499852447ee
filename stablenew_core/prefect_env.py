"""How every part of stablenew_core talks to Prefect: one place for Prefect's settings.

:func:`process_env` is the environment of every process the project launches (server, worker,
benchmarks): telemetry off, Prefect's home and result storage under ``STABLENEW_HOME``, the API
URL and key. :func:`prefect_settings` applies the same to the calling process for the duration
of a ``with`` block, so library calls work whatever the process was started with.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
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


def result_block_name(settings: Settings) -> str:
    """The LocalFileSystem block that stores finished stages (for resuming), per results path."""
    digest = hashlib.sha256(str(settings.home / "results").encode()).hexdigest()[:12]
    return f"stablenew-results-{digest}"


def _client_values(settings: Settings) -> dict[str, str]:
    values = {
        "PREFECT_HOME": str(settings.prefect_home),
        "PREFECT_API_URL": settings.api_url(),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(settings.home / "results"),
        # A named storage block: Prefect then does not ask the server for its default storage
        # before every persisted result (three API calls per job).
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"local-file-system/{result_block_name(settings)}",
        # The server's CSRF protection is off by default; skip fetching a token per client.
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "false",
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


_cache_lock = threading.Lock()
_prefect_settings_cache: dict[tuple[tuple[str, str], ...], Any] = {}


def _wanted(settings: Settings) -> dict[str, str]:
    values = _client_values(settings)
    values.pop("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", None)
    return values


def _already_current(current: Any, wanted: dict[str, str]) -> bool:
    api_key = current.api.key.get_secret_value() if current.api.key is not None else None
    return (
        str(current.api.url) == wanted["PREFECT_API_URL"]
        and str(current.home) == wanted["PREFECT_HOME"]
        and str(current.results.local_storage_path) == wanted["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]
        and current.results.default_storage_block == wanted["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"]
        and current.client.csrf_support_enabled is False
        and api_key == wanted.get("PREFECT_API_KEY")
    )


_storage_ready: set[tuple[str, str]] = set()


def ensure_result_storage(settings: Settings) -> None:
    """Save the results storage block on the server once per process (idempotent)."""
    key = (settings.api_url(), result_block_name(settings))
    if key in _storage_ready:
        return
    from prefect.filesystems import LocalFileSystem

    (settings.home / "results").mkdir(parents=True, exist_ok=True)
    with prefect_settings(settings):
        LocalFileSystem(basepath=str(settings.home / "results")).save(
            result_block_name(settings), overwrite=True
        )
    _storage_ready.add(key)


@contextmanager
def prefect_settings(settings: Settings) -> Iterator[None]:
    """Apply ``settings`` to Prefect inside this process for the block.

    Building a Prefect settings object costs ~0.1 s, so each distinct one is built once per
    process and reused; when the process-wide settings already match, nothing is entered.
    """
    configure_process(settings)
    from prefect.context import SettingsContext, get_settings_context

    context = get_settings_context()
    wanted = _wanted(settings)
    if _already_current(context.settings, wanted):
        yield
        return
    key = (("__base__", str(id(context.settings))), *sorted(wanted.items()))
    with _cache_lock:
        prefect = _prefect_settings_cache.get(key)
        if prefect is None:
            prefect = context.settings.copy_with_update(updates=_updates(wanted))
            _prefect_settings_cache[key] = prefect
    with SettingsContext(profile=context.profile, settings=prefect):
        yield


def _updates(wanted: dict[str, str]) -> dict[Any, Any]:
    from prefect.settings import (
        PREFECT_API_KEY,
        PREFECT_API_URL,
        PREFECT_CLIENT_CSRF_SUPPORT_ENABLED,
        PREFECT_HOME,
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
    )

    updates: dict[Any, Any] = {
        PREFECT_HOME: wanted["PREFECT_HOME"],
        PREFECT_API_URL: wanted["PREFECT_API_URL"],
        PREFECT_RESULTS_LOCAL_STORAGE_PATH: wanted["PREFECT_RESULTS_LOCAL_STORAGE_PATH"],
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: wanted["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"],
        PREFECT_CLIENT_CSRF_SUPPORT_ENABLED: False,
    }
    if "PREFECT_API_KEY" in wanted:
        updates[PREFECT_API_KEY] = wanted["PREFECT_API_KEY"]
    return updates
