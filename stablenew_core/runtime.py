"""The runtime a pipeline executes with: settings and a warm WebUI client, per process.

Flow code never receives settings as parameters (they hold credentials, and parameters are
recorded in history). It asks :func:`current_runtime` instead: the runtime installed by the
runner (:func:`use_runtime`), or one built once from the environment, as in a process started by
a stock Prefect worker. The WebUI client is created once and reused (one pooled connection).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .settings import Settings

if TYPE_CHECKING:
    from .webui.client import WebUIClient


@dataclass
class Runtime:
    """Settings plus lazily created, reused resources."""

    settings: Settings
    _client: WebUIClient | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def client(self) -> WebUIClient:
        """The WebUI client for ``settings.webui_url``, created on first use."""
        with self._lock:
            if self._client is None:
                from .webui.client import WebUIClient

                self._client = WebUIClient.from_settings(self.settings)
            return self._client

    def close(self) -> None:
        """Close the WebUI client's connections."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


_current: ContextVar[Runtime | None] = ContextVar("stablenew_runtime", default=None)
_default: Runtime | None = None
_default_lock = threading.Lock()


def current_runtime() -> Runtime:
    """The runtime installed by :func:`use_runtime`, else one built from the environment."""
    runtime = _current.get()
    if runtime is not None:
        return runtime
    global _default
    with _default_lock:
        if _default is None:
            _default = Runtime(Settings())
        return _default


@contextmanager
def use_runtime(runtime: Runtime) -> Iterator[Runtime]:
    """Install ``runtime`` for the code run inside the block (and threads copying the context)."""
    token = _current.set(runtime)
    try:
        yield runtime
    finally:
        _current.reset(token)


@dataclass
class RunControl:
    """Signals between whoever runs a job and the job's code, for one run."""

    cancel_requested: threading.Event = field(default_factory=threading.Event)
    progress: Callable[[str, float, str], None] | None = None
    """Called with (stage, fraction of the stage 0..1, text) while a stage runs."""

    def should_stop(self) -> bool:
        """True once cancellation was requested."""
        return self.cancel_requested.is_set()


_control: ContextVar[RunControl | None] = ContextVar("stablenew_run_control", default=None)


def current_control() -> RunControl:
    """The control of the run in progress (a fresh, never-cancelled one if none is installed)."""
    control = _control.get()
    return control if control is not None else RunControl()


def installed_control() -> RunControl | None:
    """The control installed by :func:`use_control`, if any."""
    return _control.get()


@contextmanager
def use_control(control: RunControl) -> Iterator[RunControl]:
    """Install ``control`` for the run executed inside the block."""
    token = _control.set(control)
    try:
        yield control
    finally:
        _control.reset(token)
