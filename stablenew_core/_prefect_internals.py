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
* Client side, ``prefect.flow_engine.observe_flow_run_suspension``: for every deployment run the
  engine starts a thread with its own event loop and a websocket subscription that waits for
  the run to be marked Suspended from elsewhere, blocks the run's start until it is subscribed
  and joins it at exit (it sleeps in 0.2 s steps): ~0.2 s of dead time between queued jobs,
  measured. The pipeline never suspends itself and neither Prefect's UI nor its CLI suspends a
  running run, so the queue worker runs its flow runs without that observer
  (:func:`without_suspension_observer`); every other flow run in the process keeps it.
* Client side, ``prefect.task_engine._concurrency``: every tagged task run asks the API for
  slots of the ``tag:<tag>`` concurrency limits, through a service (a thread, an event loop and
  a client) keyed by the run's exact tag set; a job's tags include ``job:<id>``, so each job
  starts a new service (~50 ms) even when no tag limit exists at all. We read which ``tag:``
  limits exist (at most every :data:`TAG_LIMITS_TTL_SECONDS`, per API) and skip the
  acquisition only for task runs none of whose tags has a limit; when limits exist, or cannot
  be read, Prefect's own acquisition runs unchanged. A tag limit created while jobs run applies
  within that many seconds.

:func:`check_internals` verifies that the names we touch still exist with the shape we expect;
the test suite calls it, so an upgrade that moves them fails loudly instead of silently slowing
down or breaking. Only :data:`PINNED_PREFECT_VERSION` is known to be right.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any

PINNED_PREFECT_VERSION = "3.9.1"
TAG_LIMITS_TTL_SECONDS = 5.0
TAG_LIMITS_PAGE = 200

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
    original = _original(original)
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
    problems.extend(_suspension_observer_problems())
    problems.extend(_tag_concurrency_problems())
    if problems:
        raise PrefectInternalsChanged("; ".join(problems))


def _original(value: Any) -> Any:
    return getattr(value, "__wrapped_original__", value)


def _suspension_observer_problems() -> list[str]:
    import prefect.flow_engine as flow_engine

    observer = _original(getattr(flow_engine, "observe_flow_run_suspension", None))
    if observer is None:
        return ["prefect.flow_engine.observe_flow_run_suspension is gone"]
    parameters = list(inspect.signature(observer).parameters)
    if parameters[:2] != ["flow_run_id", "suspension_request"]:
        return [
            f"observe_flow_run_suspension takes {parameters}, "
            "expected ['flow_run_id', 'suspension_request', ...]"
        ]
    setup = getattr(flow_engine.BaseFlowRunEngine, "setup_flow_run_suspension_request", None)
    if setup is None or "observe_flow_run_suspension(" not in inspect.getsource(setup):
        return [
            "BaseFlowRunEngine.setup_flow_run_suspension_request no longer calls "
            "observe_flow_run_suspension"
        ]
    return []


def _tag_concurrency_problems() -> list[str]:
    import prefect.task_engine as task_engine
    from prefect.concurrency import _sync

    acquire = _original(getattr(task_engine, "_concurrency", None))
    if acquire is not _sync.concurrency:
        return [
            "prefect.task_engine._concurrency is no longer prefect.concurrency._sync.concurrency"
        ]
    parameters = list(inspect.signature(acquire).parameters)
    if parameters[:2] != ["names", "occupy"]:
        return [f"prefect.concurrency._sync.concurrency takes {parameters}, expected names, occupy"]
    source = inspect.getsource(task_engine.SyncTaskRunEngine.start)
    if 'names=[f"tag:{tag}" for tag in self.task_run.tags]' not in source:
        return ["SyncTaskRunEngine.start no longer acquires 'tag:<tag>' concurrency slots"]
    return []


def check_server_internals() -> None:
    """Raise :class:`PrefectInternalsChanged` unless the server's SQLite names are as expected."""
    from prefect.server.database import configurations

    problems = []
    config = getattr(configurations, "AioSqliteConfiguration", None)
    begin = getattr(config, "begin_transaction", None)
    begin = _original(begin)
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
    """Stop Prefect's tag-concurrency slot services once a job has ended.

    Prefect acquires tag concurrency slots for a tagged task run (when a ``tag:`` limit exists,
    see :data:`tag_limits`) through a service keyed by the run's exact tag set, each with its
    own thread and client, kept for the life of the process. A job's tags include
    ``job:<id>``, so a long-lived worker would keep one more thread, connection and ~2 MB per
    job (measured by ``bench/gap_attribution.py``). The next tagged task run simply starts a new
    service. Only those services are stopped: Prefect keeps every queue service (the events and
    log workers too) in one registry, and its ``drain_all`` would stop them all. Non-blocking.
    """
    from prefect.concurrency.services import ConcurrencySlotAcquisitionWithLeaseService as Slots

    registry: dict[int, Any] = Slots._instances  # type: ignore[misc]
    with Slots._instance_cache_lock:
        services = [service for service in registry.values() if isinstance(service, Slots)]
    for service in services:
        service._drain(at_exit=False)


def check_service_internals() -> None:
    """Raise :class:`PrefectInternalsChanged` unless the concurrency service is as expected."""
    try:
        from prefect.concurrency.services import ConcurrencySlotAcquisitionWithLeaseService as Slots
    except ImportError as exc:
        raise PrefectInternalsChanged(f"prefect.concurrency.services moved: {exc}") from exc
    problems = []
    if not isinstance(getattr(Slots, "_instances", None), dict):
        problems.append("the queue services' _instances registry is gone")
    if not hasattr(Slots, "_instance_cache_lock"):
        problems.append("the queue services' _instance_cache_lock is gone")
    drain = getattr(Slots, "_drain", None)
    if drain is None or list(inspect.signature(drain).parameters) != ["self", "at_exit"]:
        problems.append("ConcurrencySlotAcquisitionWithLeaseService._drain(self, at_exit) is gone")
    if problems:
        raise PrefectInternalsChanged("; ".join(problems))


_skip_suspension_observer: ContextVar[bool] = ContextVar(
    "stablenew_skip_suspension_observer", default=False
)


@contextmanager
def without_suspension_observer() -> Iterator[None]:
    """Flow runs started inside the block run without Prefect's suspension observer."""
    token = _skip_suspension_observer.set(True)
    try:
        yield
    finally:
        _skip_suspension_observer.reset(token)


class _TagLimits:
    """Which ``tag:`` concurrency limits exist on each API, re-read at most every TTL."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, tuple[float, frozenset[str] | None]] = {}

    def may_apply(self, names: list[str]) -> bool:
        from prefect.settings import PREFECT_API_URL

        api = str(PREFECT_API_URL.value() or "")
        now = time.monotonic()
        with self._lock:
            known = self._known.get(api)
        if known is None or now - known[0] > TAG_LIMITS_TTL_SECONDS:
            known = (now, self._read())
            with self._lock:
                self._known[api] = known
        defined = known[1]
        return defined is None or any(name in defined for name in names)

    def forget(self) -> None:
        with self._lock:
            self._known.clear()

    @staticmethod
    def _read() -> frozenset[str] | None:
        """The names of the ``tag:`` limits, or None when unknown (then Prefect checks)."""
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                limits = client.read_global_concurrency_limits(limit=TAG_LIMITS_PAGE)
        except Exception:
            return None
        if len(limits) >= TAG_LIMITS_PAGE:
            return None
        return frozenset(limit.name for limit in limits if limit.name.startswith("tag:"))


tag_limits = _TagLimits()


def install() -> None:
    """Apply the client-side adjustments once per process (idempotent, thread-safe)."""
    global _installed
    with _lock:
        if _installed:
            return
        check_internals()
        check_service_internals()
        import prefect.flow_engine as flow_engine
        import prefect.task_engine as task_engine

        send_heartbeats: Callable[..., Any] = flow_engine._send_heartbeats

        @contextmanager
        def send_heartbeats_without_join(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
            with send_heartbeats(engine, join_on_exit=False):
                yield

        observe: Callable[..., Any] = flow_engine.observe_flow_run_suspension

        @contextmanager
        def observe_unless_skipped(*args: Any, **kwargs: Any) -> Iterator[None]:
            if _skip_suspension_observer.get():
                yield
                return
            with observe(*args, **kwargs):
                yield

        acquire: Callable[..., Any] = task_engine._concurrency

        @contextmanager
        def tag_concurrency(names: Any, *args: Any, **kwargs: Any) -> Iterator[None]:
            if names and not tag_limits.may_apply(list(names)):
                yield
                return
            with acquire(names, *args, **kwargs):
                yield

        send_heartbeats_without_join.__wrapped_original__ = send_heartbeats  # type: ignore[attr-defined]
        observe_unless_skipped.__wrapped_original__ = observe  # type: ignore[attr-defined]
        tag_concurrency.__wrapped_original__ = acquire  # type: ignore[attr-defined]
        flow_engine._send_heartbeats = send_heartbeats_without_join
        flow_engine.observe_flow_run_suspension = observe_unless_skipped
        task_engine._concurrency = tag_concurrency
        _installed = True


def installed() -> bool:
    """True once :func:`install` ran in this process."""
    return _installed
