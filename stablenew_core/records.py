"""From Prefect's run records to job records: the one mapping of states to job statuses.

Used by the flow (hooks), the runner (direct results), the service and the history store, so
that a job reads the same wherever it is looked at.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from prefect.client.schemas.objects import FlowRun, State, StateType
from pydantic import ValidationError

from .errors import ConfigError
from .jobs import JOB_STATUSES, Job, JobRecord, JobResult, JobStatus

# The one mapping from Prefect's state types to job statuses.
STATUS_BY_STATE_TYPE: dict[StateType, JobStatus] = {
    StateType.SCHEDULED: "queued",
    StateType.PENDING: "queued",
    StateType.PAUSED: "queued",
    StateType.RUNNING: "running",
    StateType.CANCELLING: "running",
    StateType.COMPLETED: "completed",
    StateType.FAILED: "failed",
    StateType.CANCELLED: "cancelled",
    StateType.CRASHED: "crashed",
}


def state_types_for(statuses: Iterable[str]) -> list[StateType]:
    """The Prefect state types that show as any of ``statuses``."""
    wanted = set(statuses)
    unknown = wanted - set(JOB_STATUSES)
    if unknown:
        raise ConfigError(
            f"unknown status {sorted(unknown)}; expected one of {', '.join(JOB_STATUSES)}"
        )
    return [state for state, status in STATUS_BY_STATE_TYPE.items() if status in wanted]


class StateLike(Protocol):
    """What a record reads of a run's state: Prefect's State, or a slimmer parse of it."""

    @property
    def type(self) -> StateType: ...
    @property
    def name(self) -> str | None: ...
    @property
    def message(self) -> str | None: ...


class FlowRunLike(Protocol):
    """What a record reads of a flow run: Prefect's FlowRun, or a slimmer parse of it
    (the history store's, which skips the fields no record uses)."""

    @property
    def id(self) -> Any: ...
    @property
    def parameters(self) -> Mapping[str, Any]: ...
    @property
    def state(self) -> StateLike | None: ...
    @property
    def start_time(self) -> datetime | None: ...
    @property
    def end_time(self) -> datetime | None: ...


def _state_error(state: StateLike | None) -> str | None:
    if state is None or state.type not in (StateType.FAILED, StateType.CRASHED):
        if state is not None and state.type == StateType.CANCELLED:
            return state.message or "cancelled"
        return None
    return state.message or state.name


def job_from_parameters(parameters: Mapping[str, Any]) -> Job | None:
    """The job a flow run was created for, or None if its parameters are not a job."""
    raw = parameters.get("job")
    if isinstance(raw, Job):
        return raw
    if not isinstance(raw, dict):
        return None
    try:
        return Job.model_validate(raw)
    except ValidationError:
        return None


def build_record(
    job: Job,
    *,
    state: StateLike | None,
    flow_run_id: str | None,
    outputs: list[str],
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
) -> JobRecord:
    """A job's record from its job and its run's state."""
    status: JobStatus = STATUS_BY_STATE_TYPE[state.type] if state is not None else "queued"
    return JobRecord(
        job_id=job.job_id,
        run_mode=job.run_mode,
        source=job.source,
        prompt_source=job.prompt_source,
        prompt_pack_id=job.prompt_pack_id,
        config_snapshot=job.config_snapshot,
        status=status,
        state_name=state.name if state is not None else None,
        created_at=job.created_at,
        started_at=started_at,
        finished_at=finished_at if status not in ("queued", "running") else None,
        error=_state_error(state),
        outputs=outputs,
        flow_run_id=flow_run_id,
        priority=job.priority,
        retried_from=job.retried_from,
    )


def record_from_flow_run(flow_run: FlowRunLike | FlowRun, outputs: list[str]) -> JobRecord | None:
    """A job's record from its flow run (None if the run is not a stablenew job)."""
    job = job_from_parameters(flow_run.parameters)
    if job is None:
        return None
    return build_record(
        job,
        state=flow_run.state,
        flow_run_id=str(flow_run.id),
        outputs=outputs,
        started_at=flow_run.start_time,
        finished_at=flow_run.end_time,
    )


def outputs_from_result(state: State) -> list[str]:
    """The image paths of a finished in-process run, without an API call."""
    if state.type != StateType.COMPLETED:
        return []
    try:
        result = state.result(raise_on_failure=False)
    except Exception:
        return []
    return list(result.outputs) if isinstance(result, JobResult) else []


def record_from_state(job: Job, state: State, flow_run_id: object) -> JobRecord:
    """A finished in-process run's record, from its final state (no API call)."""
    return build_record(
        job,
        state=state,
        flow_run_id=str(flow_run_id) if flow_run_id else None,
        outputs=outputs_from_result(state),
        finished_at=state.timestamp,
    )
