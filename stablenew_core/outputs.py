"""Outputs: where a job's files go, the PNGs with their text chunks, and manifest.json.

Owns the output layout (``<root>/<YYYY-MM-DD of created_at, UTC>/<job_id>/``), the PNG
re-encoding that keeps two text chunks -- ``parameters`` (A1111's infotext, which other tools
read) and ``stablenew`` (JSON: job_id, run_mode, source, config_hash, stage, index) -- and the
manifest that lists every stage's files with their sha256. Every write is atomic (temporary
file, then ``os.replace``). No prompt text is ever used in a path. No Prefect here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin

from .config import redact
from .errors import ConfigError
from .jobs import Job

if TYPE_CHECKING:
    from .stages import StageResult

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
PARAMETERS_CHUNK = "parameters"
STABLENEW_CHUNK = "stablenew"
_SAFE_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def job_output_dir(output_root: Path, job: Job) -> Path:
    """``output_root / <created_at UTC as %Y-%m-%d> / <job_id>`` (not created here)."""
    if not _SAFE_JOB_ID.fullmatch(job.job_id):
        raise ConfigError(
            f"job_id may hold only letters, digits, '-' and '_' (1-64), got {job.job_id!r}"
        )
    created = job.created_at
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    day = created.astimezone(UTC).strftime("%Y-%m-%d")
    return Path(output_root) / day / job.job_id


def stablenew_metadata(job: Job, stage: str, index: int) -> dict[str, Any]:
    """The JSON of the ``stablenew`` PNG text chunk."""
    return {
        "job_id": job.job_id,
        "run_mode": job.run_mode,
        "source": job.source,
        "config_hash": job.config.config_hash(),
        "stage": str(stage),
        "index": index,
    }


def write_png(
    path: Path, png: bytes, *, parameters: str | None, stablenew: dict[str, Any]
) -> tuple[str, int, int]:
    """Re-encode ``png`` to ``path`` atomically with the two text chunks.

    Text chunks already in ``png`` are kept, except that ``parameters`` (when given) and
    ``stablenew`` are set from the arguments. Returns (sha256 of the file, width, height).
    """
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        info = PngImagePlugin.PngInfo()
        texts = {
            key: value
            for key, value in image.info.items()
            if isinstance(key, str) and isinstance(value, str)
        }
        if parameters is not None:
            texts[PARAMETERS_CHUNK] = parameters
        texts[STABLENEW_CHUNK] = json.dumps(stablenew, sort_keys=True, separators=(",", ":"))
        for key, value in texts.items():
            info.add_text(key, value)  # Pillow switches to iTXt for non-Latin-1 text
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
        width, height = image.size
    data = buffer.getvalue()
    _atomic_write(Path(path), data)
    return hashlib.sha256(data).hexdigest(), width, height


def read_png_text(path: Path) -> dict[str, str]:
    """The text chunks of a PNG file."""
    with Image.open(path) as image:
        image.load()
        return {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(
    job: Job,
    results: list[StageResult],
    job_dir: Path,
    *,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``job_dir/manifest.json`` atomically and return its path.

    The job part carries the redacted config snapshot (``job.config_snapshot``, else the
    config itself); each stage lists its files (relative to ``job_dir``) with sha256, seed and
    size, the seeds, the parsed WebUI info, the infotexts, the task ids and its timing.
    """
    job_dir = Path(job_dir)
    snapshot = job.config_snapshot if job.config_snapshot is not None else job.config.to_dict()
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "written_at": datetime.now(UTC).isoformat(),
        "job": {
            "job_id": job.job_id,
            "created_at": job.created_at.isoformat(),
            "run_mode": job.run_mode,
            "source": job.source,
            "prompt_source": job.prompt_source,
            "prompt_pack_id": job.prompt_pack_id,
            "priority": job.priority,
            "retried_from": job.retried_from,
            "config_hash": job.config.config_hash(),
            "config_snapshot": redact(snapshot),
        },
        "stages": [_stage_entry(result, job_dir) for result in results],
    }
    if extra:
        manifest["extra"] = redact(extra)
    path = job_dir / MANIFEST_NAME
    text = json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n"
    _atomic_write(path, text.encode("utf-8"))
    return path


def read_manifest(job_dir: Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a job directory (FileNotFoundError when missing)."""
    data = json.loads((Path(job_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{Path(job_dir) / MANIFEST_NAME} does not hold a JSON object")
    return data


def _stage_entry(result: StageResult, job_dir: Path) -> dict[str, Any]:
    return {
        "name": str(result.stage),
        "started_at": result.started_at.isoformat(),
        "finished_at": result.finished_at.isoformat(),
        "seconds": round((result.finished_at - result.started_at).total_seconds(), 3),
        "seeds": list(result.seeds),
        "task_ids": list(result.task_ids),
        "files": [
            {
                "index": image.index,
                "path": _relative(Path(image.path), job_dir),
                "sha256": image.sha256,
                "seed": image.seed,
                "width": image.width,
                "height": image.height,
            }
            for image in result.images
        ],
        "info": result.info,
        "infotexts": list(result.infotexts),
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a temporary file beside ``path`` (mode 0666 less the umask), then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_name = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    handle = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
