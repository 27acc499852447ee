"""Every use of Prefect's private behaviour, in one place, pinned to one Prefect version.

What we change, and why:

* Client side, ``prefect.flow_engine._send_heartbeats``: a sync flow run joins its heartbeat
  thread at exit, which sleeps in 1 s steps: up to ~1 s of dead time after every job. We keep
  the heartbeats (zombie detection needs them) and only skip the join; the thread is a daemon
  that sees its stop event within a second and exits on its own.
* Server side (only in the server process this project starts, see
  :mod:`stablenew_core._server_main`),
  ``prefect.server.database.configurations.AioSqliteConfiguration.begin_transaction``: on
  SQLite, Prefect opens write transactions with ``BEGIN DEFERRED``; ``POST /flow_runs/`` reads
  before it writes, and when the task-run recorder (or the event persister, or log writes)
  commits in between, SQLite fails the upgrade to a writer at once ("database is locked",
  without waiting on busy_timeout). The API answers 503 and the client backs off ~2 s: the
  stalls measured in ``bench/BACKENDS.md``. Prefect's own comment in ``setup_sqlite`` names the
  cure: ``BEGIN IMMEDIATE``, which takes the write lock up front and so waits on busy_timeout
  instead of failing. We open every write transaction that way; reads outside transactions are
  unchanged, and task runs are still recorded.

:func:`check_internals` verifies that the names we touch still exist with the shape we expect;
the test suite calls it, so an upgrade that moves them fails loudly instead of silently slowing
down or breaking. Only :data:`PINNED_PREFECT_VERSION` is known to be right.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
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


def check_server_internals() -> None:
    """Raise :class:`PrefectInternalsChanged` unless the server's SQLite names are as expected."""
    from prefect.server.database import configurations

    problems = []
    config = getattr(configurations, "AioSqliteConfiguration", None)
    begin = getattr(config, "begin_transaction", None)
    begin = getattr(begin, "__wrapped_original__", begin)
    if begin is None:
        problems.append("AioSqliteConfiguration.begin_transaction is gone")
    else:
        parameters = list(inspect.signature(begin).parameters)
        if parameters != ["self", "session", "with_for_update"]:
            problems.append(
                f"AioSqliteConfiguration.begin_transaction takes {parameters}, "
                "expected ['self', 'session', 'with_for_update']"
            )
        source = inspect.getsource(begin)
        if '"IMMEDIATE" if with_for_update else "DEFERRED"' not in source:
            problems.append("begin_transaction no longer maps with_for_update to BEGIN IMMEDIATE")
    if not hasattr(configurations, "SQLITE_BEGIN_MODE"):
        problems.append("prefect.server.database.configurations.SQLITE_BEGIN_MODE is gone")
    if problems:
        raise PrefectInternalsChanged("; ".join(problems))


def install_server_patches() -> None:
    """In the server process: open every SQLite write transaction with BEGIN IMMEDIATE."""
    check_internals()
    check_server_internals()
    from prefect.server.database import configurations

    config = configurations.AioSqliteConfiguration
    original = config.begin_transaction
    if hasattr(original, "__wrapped_original__"):
        return

    @asynccontextmanager
    async def begin_immediate(
        self: Any, session: Any, with_for_update: bool = False
    ) -> AsyncIterator[Any]:
        async with original(self, session, with_for_update=True) as transaction:
            yield transaction

    begin_immediate.__wrapped_original__ = original  # type: ignore[attr-defined]
    config.begin_transaction = begin_immediate  # type: ignore[method-assign]


def release_job_services() -> None:
    """Stop Prefect's per-tag-set concurrency services once a job has ended.

    Prefect acquires tag concurrency slots for every tagged task run through a service keyed by
    the run's exact tag set, each with its own thread and client, kept for the life of the
    process. A job's tags include ``job:<id>``, so a long-lived worker would keep one more
    thread, connection and ~2 MB per job (measured by ``bench/gap_attribution.py``). The next
    tagged task run simply starts a new service. Non-blocking.
    """
    from prefect.concurrency.services import ConcurrencySlotAcquisitionWithLeaseService

    ConcurrencySlotAcquisitionWithLeaseService.drain_all(timeout=0, at_exit=False)


def check_service_internals() -> None:
    """Raise :class:`PrefectInternalsChanged` unless the concurrency service is as expected."""
    try:
        from prefect.concurrency.services import ConcurrencySlotAcquisitionWithLeaseService
    except ImportError as exc:
        raise PrefectInternalsChanged(f"prefect.concurrency.services moved: {exc}") from exc
    drain_all = getattr(ConcurrencySlotAcquisitionWithLeaseService, "drain_all", None)
    if drain_all is None or list(inspect.signature(drain_all).parameters) != [
        "timeout",
        "at_exit",
    ]:
        raise PrefectInternalsChanged(
            "ConcurrencySlotAcquisitionWithLeaseService.drain_all(timeout, at_exit) is gone"
        )


def install() -> None:
    """Apply the adjustments once per process (idempotent, thread-safe)."""
    global _installed
    with _lock:
        if _installed:
            return
        check_internals()
        check_service_internals()
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
