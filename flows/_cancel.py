"""Cancellation without a subprocess to kill: watch the flow run's state, signal the job.

While a job runs, a daemon thread reads its flow run once a second; when someone (the UI,
``stablenew cancel``, ``JobService.cancel``) sets it Cancelling, the thread sets the run's
cancel event. The job's stages check it at safe points: between requests, and while polling
the WebUI, where it interrupts the WebUI only if the running task is the job's own.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from types import TracebackType
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType

from stablenew_core.prefect_env import prefect_settings
from stablenew_core.runtime import RunControl
from stablenew_core.settings import Settings

logger = logging.getLogger("stablenew_core.cancel")

POLL_SECONDS = 1.0


class CancelWatcher:
    """Sets ``control.cancel_requested`` once the flow run is Cancelling or Cancelled."""

    def __init__(self, flow_run_id: UUID | None, control: RunControl, settings: Settings) -> None:
        self.flow_run_id = flow_run_id
        self.control = control
        self.settings = settings
        self._done = threading.Event()
        # A context of its own: the thread opens its own client for the job's settings instead
        # of sharing the run's client (and its open/close count) across threads.
        self._thread = threading.Thread(
            target=contextvars.Context().run, args=(self._loop,), daemon=True, name="cancel-watcher"
        )

    def __enter__(self) -> CancelWatcher:
        if self.flow_run_id is not None:
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()

    def _loop(self) -> None:
        if self._done.wait(POLL_SECONDS):
            return
        with prefect_settings(self.settings), get_client(sync_client=True) as client:
            while True:
                try:
                    run: FlowRun = client.read_flow_run(self.flow_run_id)  # type: ignore[arg-type]
                except Exception:
                    logger.debug("cannot read flow run %s", self.flow_run_id, exc_info=True)
                else:
                    if run.state_type in (StateType.CANCELLING, StateType.CANCELLED):
                        logger.info("flow run %s: cancellation requested", self.flow_run_id)
                        self.control.cancel_requested.set()
                        return
                if self._done.wait(POLL_SECONDS):
                    return
