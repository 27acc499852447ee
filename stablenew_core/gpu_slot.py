"""GpuSlot: one job at a time per WebUI on this machine, first come, first served.

Direct jobs (in the caller's process) and queued jobs (in the worker) share one WebUI. The
WebUI serialises single requests, but a job is a chain of requests: without a job-level slot,
two jobs would interleave stages. A waiter takes a ticket (a file named by its arrival time and
pid in ``<home>/gpu/<webui>/``) and holds the slot while its ticket is the oldest live one.
Tickets of dead processes are removed, so a killed job never blocks the slot.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ._proc import pid_alive
from .errors import JobCancelledError


class GpuSlot:
    """A FIFO, crash-safe, cross-process mutex keyed by the WebUI URL."""

    def __init__(self, root: Path, webui_url: str, *, poll_seconds: float = 0.01) -> None:
        key = hashlib.sha256(webui_url.encode()).hexdigest()[:16]
        self.directory = root / key
        self.poll_seconds = poll_seconds

    def _live_tickets(self) -> list[Path]:
        tickets = []
        for path in self.directory.glob("*.ticket"):
            try:
                pid = int(path.stem.rsplit("-", 1)[1])
            except (IndexError, ValueError):
                continue
            if pid_alive(pid):
                tickets.append(path)
            else:
                path.unlink(missing_ok=True)
        return sorted(tickets)

    def holder(self) -> str | None:
        """The label written by the current holder, if any."""
        tickets = self._live_tickets()
        if not tickets:
            return None
        try:
            return tickets[0].read_text() or None
        except OSError:
            return None

    @contextmanager
    def hold(
        self,
        label: str,
        *,
        on_wait: Callable[[str | None], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[None]:
        """Wait for the slot and hold it for the block.

        ``on_wait(holder_label)`` is called once if the slot is busy; ``should_stop()`` is
        polled while waiting and, when true, the ticket is withdrawn and
        :class:`~stablenew_core.errors.JobCancelledError` raised.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        ticket = self.directory / f"{time.time_ns():020d}-{os.getpid()}.ticket"
        ticket.write_text(label)
        try:
            notified = False
            while True:
                tickets = self._live_tickets()
                if not tickets or tickets[0] == ticket:
                    break
                if ticket not in tickets:  # removed from outside: take a new place at the end
                    ticket.write_text(label)
                    continue
                if not notified and on_wait is not None:
                    notified = True
                    try:
                        on_wait(tickets[0].read_text() or None)
                    except OSError:
                        on_wait(None)
                if should_stop is not None and should_stop():
                    raise JobCancelledError("cancelled while waiting for the GPU")
                time.sleep(self.poll_seconds)
            yield
        finally:
            ticket.unlink(missing_ok=True)
