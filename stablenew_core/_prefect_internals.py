"""Every use of Prefect's private behaviour, in one place, pinned to one Prefect version.

What we change, and why:

* ``prefect.flow_engine._send_heartbeats``: a sync flow run joins its heartbeat thread at exit,
  which sleeps in 1 s steps: up to ~1 s of dead time after every job. We keep the heartbeats
  (zombie detection needs them) and only skip the join; the thread is a daemon that sees its
  stop event within a second and exits on its own.

:func:`check_internals` verifies that the names we touch still exist with the shape we expect;
the test suite calls it, so an upgrade that moves them fails loudly instead of silently slowing
down or breaking. Only :data:`PINNED_PREFECT_VERSION` is known to be right.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PINNED_PREFECT_VERSION = "3.9.1"

_lock = threading.Lock()
_installed = False


class PrefectInternalsChanged(RuntimeError):
    """The installed Prefect no longer has the private names this module adjusts."""


def check_internals() -> None:
    """Raise :class:`PrefectInternalsChanged` unless the private names are as expected."""
    import prefect
    import prefect.flow_engine as flow_engine

    problems = []
    if prefect.__version__ != PINNED_PREFECT_VERSION:
        problems.append(
            f"prefect {prefect.__version__} is installed; this module is written for "
            f"{PINNED_PREFECT_VERSION}"
        )
    original = getattr(flow_engine, "_send_heartbeats", None)
    original = getattr(original, "__wrapped_original__", original)
    if original is None:
        problems.append("prefect.flow_engine._send_heartbeats is gone")
    else:
        parameters = inspect.signature(original).parameters
        if list(parameters) != ["engine", "join_on_exit"]:
            problems.append(
                f"prefect.flow_engine._send_heartbeats takes {list(parameters)}, "
                "expected ['engine', 'join_on_exit']"
            )
        source = inspect.getsource(flow_engine.FlowRunEngine.run_context)
        if "_send_heartbeats(self)" not in source:
            problems.append("FlowRunEngine.run_context no longer calls _send_heartbeats(self)")
    if problems:
        raise PrefectInternalsChanged("; ".join(problems))


def install() -> None:
    """Apply the adjustments once per process (idempotent, thread-safe)."""
    global _installed
    with _lock:
        if _installed:
            return
        check_internals()
        import prefect.flow_engine as flow_engine

        original: Callable[..., Any] = flow_engine._send_heartbeats

        @contextmanager
        def send_heartbeats_without_join(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
            with original(engine, join_on_exit=False):
                yield

        send_heartbeats_without_join.__wrapped_original__ = original  # type: ignore[attr-defined]
        flow_engine._send_heartbeats = send_heartbeats_without_join
        _installed = True


def installed() -> bool:
    """True once :func:`install` ran in this process."""
    return _installed
