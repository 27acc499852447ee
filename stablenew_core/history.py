"""JobHistoryStore: the history of every job, read from Prefect's own run records.

There is no second store: a job's record is its flow run (tags, parameters, state, timestamps)
plus its outputs table artifact. Filters are pushed down to Prefect's API as tags
(``run_mode:``, ``source:``, ``prompt_source:``, ``pack:``, ``job:``) and state types; pages
are at most 200 runs (Prefect's cap), so larger limits are read page by page.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator
from typing import Any

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort

from .errors import ConfigError, JobNotFoundError
from .jobs import OUTPUTS_ARTIFACT_PREFIX, TAG_ROOT, JobRecord
from .prefect_env import prefect_settings
from .records import record_from_flow_run, state_types_for
from .settings import Settings

PAGE_SIZE = 200


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

    def _client(self) -> Any:
        return get_client(sync_client=True)

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
    ) -> FlowRunFilter:
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
            flow_filter.state = FlowRunFilterState(
                type=FlowRunFilterStateType(any_=state_types_for(statuses))
            )
        return flow_filter

    def _outputs(self, client: SyncPrefectClient, runs: list[FlowRun]) -> dict[str, list[str]]:
        finished = [run.id for run in runs if run.state_type == StateType.COMPLETED]
        if not finished:
            return {}
        artifacts: builtins.list[Any] = []
        while True:  # a resumed job has two outputs artifacts: page until all are read
            page = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(like_=OUTPUTS_ARTIFACT_PREFIX)
                ),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=finished)),
                sort=ArtifactSort.CREATED_DESC,
                limit=PAGE_SIZE,
                offset=len(artifacts),
            )
            artifacts.extend(page)
            if len(page) < PAGE_SIZE:
                break
        outputs: dict[str, list[str]] = {}
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

    def _records(self, client: SyncPrefectClient, runs: list[FlowRun]) -> list[JobRecord]:
        outputs = self._outputs(client, runs)
        records = []
        for run in runs:
            record = record_from_flow_run(run, outputs.get(str(run.id), []))
            if record is not None:
                records.append(record)
        return records

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
        flow_filter = self._flow_run_filter(
            run_mode=run_mode,
            source=source,
            prompt_source=prompt_source,
            prompt_pack_id=prompt_pack_id,
            status=status,
        )
        records: list[JobRecord] = []
        with prefect_settings(self.settings), self._client() as client:
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
        with prefect_settings(self.settings), self._client() as client:
            return int(client.count_flow_runs(flow_run_filter=flow_filter))

    def _pages(
        self, client: SyncPrefectClient, flow_filter: FlowRunFilter, *, limit: int, offset: int
    ) -> Iterator[builtins.list[FlowRun]]:
        remaining = limit
        while remaining > 0:
            page = client.read_flow_runs(
                flow_run_filter=flow_filter,
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=min(remaining, PAGE_SIZE),
                offset=offset,
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
        with prefect_settings(self.settings), self._client() as client:
            runs = client.read_flow_runs(
                flow_run_filter=flow_filter, sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1
            )
            records = self._records(client, runs)
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
