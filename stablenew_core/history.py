"""JobHistoryStore: the history of every job, read from Prefect's own run records.

There is no second store: a job's record is its flow run (tags, parameters, state, timestamps)
plus its outputs table artifact. Filters are pushed down to Prefect's API as tags
(``run_mode:``, ``source:``, ``prompt_source:``, ``pack:``, ``job:``) and state types; pages
are at most 200 runs (Prefect's cap), so larger limits are read page by page.

Reading is kept cheap for large histories (measured with ``bench/history_bench.py`` at 100k
jobs): one Prefect client per store (opening one costs ~17 ms, mostly its TLS context), the
filter endpoints' JSON parsed into slim models of only the fields a record needs, outputs
artifacts looked up by their own ``flow_run_id`` column, and a status filter sent in whichever
of two equivalent forms the server's indexes serve best
(:meth:`JobHistoryStore._status_filter`).
"""

from __future__ import annotations

import builtins
import contextlib
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from enum import Enum
from typing import Any, Literal, TypeVar
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort
from pydantic import BaseModel, ConfigDict, TypeAdapter

from .errors import ConfigError, JobNotFoundError
from .jobs import OUTPUTS_ARTIFACT_PREFIX, TAG_ROOT, JobRecord
from .prefect_env import prefect_settings
from .records import record_from_flow_run, state_types_for
from .settings import Settings

PAGE_SIZE = 200

_Row = TypeVar("_Row", bound=BaseModel)

# A status filter matching at most this many runs (of any flow) is sent as ``state type in
# (...)``, which the server reads from its state-type index and then sorts; more, and it is
# sent as ``state type not in (the other types)``, which the server answers by walking its
# newest-first index until the page is full. Same runs either way.
SMALL_STATUS_SET = 2000


class _StateFields(BaseModel):
    """The fields of a Prefect state a job record reads."""

    model_config = ConfigDict(extra="ignore")

    type: StateType
    name: str | None = None
    message: str | None = None


class _RunFields(BaseModel):
    """The fields of a flow run (``/flow_runs/filter``) a job record reads; the rest of
    Prefect's FlowRun is skipped instead of validated."""

    model_config = ConfigDict(extra="ignore")

    id: UUID
    parameters: dict[str, Any] = {}
    state: _StateFields | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None

    @property
    def state_type(self) -> StateType | None:
        return self.state.type if self.state is not None else None


class _ArtifactFields(BaseModel):
    """The fields of an artifact (``/artifacts/filter``) the outputs of a record need."""

    model_config = ConfigDict(extra="ignore")

    flow_run_id: UUID | None = None
    data: Any = None


_RUNS = TypeAdapter(list[_RunFields])
_ARTIFACTS = TypeAdapter(list[_ArtifactFields])


def _filter_page(
    client: SyncPrefectClient,
    path: Literal["/flow_runs/filter", "/artifacts/filter"],
    where: BaseModel,
    sort: Enum,
    rows: TypeAdapter[list[_Row]],
    *,
    limit: int,
    offset: int,
) -> list[_Row]:
    """One page of Prefect's public ``POST /<resource>/filter`` endpoints (the body Prefect's
    own ``read_*`` methods send), parsed into slim rows instead of Prefect's full models."""
    response = client.request(
        "POST",
        path,
        json={
            path.split("/")[1]: where.model_dump(mode="json", exclude_unset=True),
            "sort": sort.value,
            "limit": limit,
            "offset": offset,
        },
    )
    return rows.validate_json(response.content)


def filter_tags(
    *,
    run_mode: str | None = None,
    source: str | None = None,
    prompt_source: str | None = None,
    prompt_pack_id: str | None = None,
    job_id: str | None = None,
) -> list[str]:
    """The tags every matching run carries."""
    tags = [TAG_ROOT]
    for name, value in (
        ("run_mode", run_mode),
        ("source", source),
        ("prompt_source", prompt_source),
        ("pack", prompt_pack_id),
        ("job", job_id),
    ):
        if value:
            tags.append(f"{name}:{value}")
    return tags


class JobHistoryStore:
    """Read-only view of every job's record, straight from Prefect."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._shared: SyncPrefectClient | None = None
        self._lock = threading.Lock()

    def _client(self) -> SyncPrefectClient:
        """This store's Prefect client, opened on first use and kept (thread-safe: httpx)."""
        with self._lock:
            if self._shared is None:
                with prefect_settings(self.settings):
                    # httpx_settings={} (Prefect's defaults): always a client of its own, never
                    # the one of a surrounding client context (a flow run's, a runner's).
                    client = get_client(sync_client=True, httpx_settings={})
                    client.__enter__()  # held open until close(); with-blocks never close it
                self._shared = client
            return self._shared

    def close(self) -> None:
        """Close this store's client (a later call opens a new one)."""
        with self._lock:
            client, self._shared = self._shared, None
        if client is not None:
            client.__exit__(None, None, None)

    def __enter__(self) -> JobHistoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _flow_run_filter(
        self,
        *,
        run_mode: str | None,
        source: str | None,
        prompt_source: str | None,
        prompt_pack_id: str | None,
        status: str | Iterable[str] | None,
        job_id: str | None = None,
        key: str | None = None,
        client: SyncPrefectClient | None = None,
    ) -> FlowRunFilter:
        """The filter for these arguments. With ``client``, a status filter takes the form
        the server serves fastest for a newest-first page (:meth:`_status_filter`)."""
        tags = filter_tags(
            run_mode=run_mode,
            source=source,
            prompt_source=prompt_source,
            prompt_pack_id=prompt_pack_id,
            job_id=job_id,
        )
        if key:
            tags.append(f"key:{key}")
        flow_filter = FlowRunFilter(tags=FlowRunFilterTags(all_=tags))
        if status:
            statuses = [status] if isinstance(status, str) else list(status)
            wanted = state_types_for(statuses)
            flow_filter.state = FlowRunFilterState(
                type=self._status_filter(client, wanted)
                if client is not None
                else FlowRunFilterStateType(any_=wanted)
            )
        return flow_filter

    @staticmethod
    def _status_filter(
        client: SyncPrefectClient, wanted: list[StateType]
    ) -> FlowRunFilterStateType:
        """``state type in wanted``, or the same set as ``not in`` the other types.

        Measured at 100k jobs on SQLite: with ``in``, the server reads every run of those
        types from its state-type index and sorts them all by expected start time (80 ms for
        10k failed runs, ~300 ms for 60k queued ones); with ``not in``, it walks its
        expected-start-time index newest first and stops at the page's end (~1 ms when the
        matches are common, a full scan when they are rare). A count of the wanted types over
        all runs, answered from the state-type index (~3 ms), picks the form.
        """
        others = [state for state in StateType if state not in wanted]
        if not others:
            return FlowRunFilterStateType(any_=wanted)
        matching = client.count_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=wanted))
            )
        )
        if matching <= SMALL_STATUS_SET:
            return FlowRunFilterStateType(any_=wanted)
        return FlowRunFilterStateType(not_any_=others)

    def _outputs(
        self, client: SyncPrefectClient, runs: builtins.list[_RunFields]
    ) -> dict[str, builtins.list[str]]:
        finished = [run.id for run in runs if run.state_type == StateType.COMPLETED]
        if not finished:
            return {}
        # Filtered on the artifact's own flow_run_id (an indexed column), not through a
        # flow-run filter: the server then reads only these runs' artifacts.
        artifact_filter = ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=finished),
            key=ArtifactFilterKey(like_=OUTPUTS_ARTIFACT_PREFIX),
        )
        artifacts: builtins.list[_ArtifactFields] = []
        while True:  # a resumed job has two outputs artifacts: page until all are read
            page = _filter_page(
                client,
                "/artifacts/filter",
                artifact_filter,
                ArtifactSort.CREATED_DESC,
                _ARTIFACTS,
                limit=PAGE_SIZE,
                offset=len(artifacts),
            )
            artifacts.extend(page)
            if len(page) < PAGE_SIZE:
                break
        outputs: dict[str, builtins.list[str]] = {}
        for artifact in reversed(artifacts):  # oldest first: the newest artifact wins
            if artifact.flow_run_id is None or not isinstance(artifact.data, list | str):
                continue
            rows = _table_rows(artifact.data)
            if not rows:
                continue
            final_stage = rows[-1].get("stage")
            outputs[str(artifact.flow_run_id)] = [
                str(row["path"]) for row in rows if row.get("stage") == final_stage
            ]
        return outputs

    def _records(
        self, client: SyncPrefectClient, runs: builtins.list[_RunFields]
    ) -> builtins.list[JobRecord]:
        outputs = self._outputs(client, runs)
        records = []
        for run in runs:
            record = record_from_flow_run(run, outputs.get(str(run.id), []))
            if record is not None:
                records.append(record)
        return records

    def _read_runs(
        self, client: SyncPrefectClient, flow_filter: FlowRunFilter, *, limit: int, offset: int
    ) -> builtins.list[_RunFields]:
        """One page of ``/flow_runs/filter`` (Prefect's public endpoint, the body Prefect's
        ``read_flow_runs`` sends), newest first, parsed into :class:`_RunFields`."""
        return _filter_page(
            client,
            "/flow_runs/filter",
            flow_filter,
            FlowRunSort.EXPECTED_START_TIME_DESC,
            _RUNS,
            limit=limit,
            offset=offset,
        )

    def list(
        self,
        *,
        run_mode: str | None = None,
        source: str | None = None,
        prompt_source: str | None = None,
        prompt_pack_id: str | None = None,
        status: str | Iterable[str] | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[JobRecord]:
        """Jobs matching every given filter, newest first."""
        if limit < 0 or offset < 0:
            raise ConfigError(f"limit and offset must be >= 0, got limit={limit} offset={offset}")
        client = self._client()
        flow_filter = self._flow_run_filter(
            run_mode=run_mode,
            source=source,
            prompt_source=prompt_source,
            prompt_pack_id=prompt_pack_id,
            status=status,
            client=client if limit else None,
        )
        records: list[JobRecord] = []
        for runs in self._pages(client, flow_filter, limit=limit, offset=offset):
            records.extend(self._records(client, runs))
        return records

    def count(
        self,
        *,
        run_mode: str | None = None,
        source: str | None = None,
        prompt_source: str | None = None,
        prompt_pack_id: str | None = None,
        status: str | Iterable[str] | None = None,
    ) -> int:
        """How many jobs match the filters."""
        flow_filter = self._flow_run_filter(
            run_mode=run_mode,
            source=source,
            prompt_source=prompt_source,
            prompt_pack_id=prompt_pack_id,
            status=status,
        )
        return int(self._client().count_flow_runs(flow_run_filter=flow_filter))

    def _pages(
        self, client: SyncPrefectClient, flow_filter: FlowRunFilter, *, limit: int, offset: int
    ) -> Iterator[builtins.list[_RunFields]]:
        remaining = limit
        while remaining > 0:
            page = self._read_runs(
                client, flow_filter, limit=min(remaining, PAGE_SIZE), offset=offset
            )
            if not page:
                return
            yield page
            remaining -= len(page)
            offset += len(page)
            if len(page) < min(remaining + len(page), PAGE_SIZE):
                return

    def find(self, job_id: str | None = None, *, key: str | None = None) -> JobRecord | None:
        """The newest record of ``job_id`` (or of the job submitted with idempotency ``key``)."""
        if not job_id and not key:
            raise ConfigError("find needs a job id or an idempotency key")
        flow_filter = self._flow_run_filter(
            run_mode=None,
            source=None,
            prompt_source=None,
            prompt_pack_id=None,
            status=None,
            job_id=job_id,
            key=key,
        )
        client = self._client()
        records = self._records(client, self._read_runs(client, flow_filter, limit=1, offset=0))
        return records[0] if records else None

    def get(self, job_id: str) -> JobRecord:
        """The record of ``job_id``; :class:`JobNotFoundError` if there is none."""
        record = self.find(job_id)
        if record is None:
            raise JobNotFoundError(f"no job {job_id!r} in history")
        return record


def _table_rows(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, str):
        import json

        try:
            data = json.loads(data)
        except ValueError:
            return []
    return [row for row in data if isinstance(row, dict)] if isinstance(data, list) else []
