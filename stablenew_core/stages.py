"""Stages: what each pipeline stage sends to the WebUI and what it writes. No Prefect here.

A pipeline is txt2img, then each enabled section of img2img, ADetailer and upscale, in that
order (:func:`planned_stages`). :func:`build_payload` is the one place that turns a job's
config into an A1111 request body (A1111 field names only; checkpoint, VAE and clip skip pinned
per request with ``override_settings``, never with POST /options). :func:`run_stage` sends the
requests of one stage -- one for the txt2img batch, one per image of the previous stage after
it -- polls the WebUI's per-task progress beside each request, honours cancellation, and writes
each image as ``<job_dir>/<stage>_<index>.png`` through :mod:`stablenew_core.outputs`.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

from PIL import Image
from pydantic import BaseModel, Field

from .config import PipelineConfig
from .errors import JobCancelledError, StablenewError, WebUIError
from .jobs import Job, utc_now
from .outputs import stablenew_metadata, write_png
from .webui.client import GenerationResult, WebUIClient

logger = logging.getLogger("stablenew_core.stages")

ADETAILER_IMG2IMG_DENOISING = 0.05
"""Denoising of the img2img pass that carries ADetailer: low, so only ADetailer's inpainting
(with its own ``ad_denoising_strength``) visibly changes the image."""

ProgressCallback = Callable[[float, str], None]
StopCheck = Callable[[], bool]


class StageName(StrEnum):
    """The stages of a pipeline, in the order they run."""

    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    ADETAILER = "adetailer"
    UPSCALE = "upscale"


class StageImage(BaseModel):
    """One image a stage wrote."""

    index: int = Field(ge=0)
    path: str
    sha256: str
    seed: int | None = None
    width: int
    height: int


class StageResult(BaseModel):
    """What one stage produced.

    ``info`` is the WebUI's parsed info for txt2img; for the per-image stages it is
    ``{"per_image": [info of image 0, info of image 1, ...]}`` (extras answers carry none).
    """

    stage: StageName
    images: list[StageImage]
    seeds: list[int]
    info: dict[str, Any]
    infotexts: list[str]
    task_ids: list[str]
    started_at: datetime
    finished_at: datetime


def planned_stages(config: PipelineConfig) -> list[StageName]:
    """txt2img, then every enabled section in pipeline order."""
    stages = [StageName.TXT2IMG]
    if config.img2img.enabled:
        stages.append(StageName.IMG2IMG)
    if config.adetailer.enabled:
        stages.append(StageName.ADETAILER)
    if config.upscale.enabled:
        stages.append(StageName.UPSCALE)
    return stages


def task_id_for(job: Job, stage: StageName | str, number: int) -> str:
    """The ``force_task_id`` of request ``number`` of a stage: ``<job_id>-<stage>-<n>``."""
    return f"{job.job_id}-{StageName(stage).value}-{number}"


def uses_extras(stage: StageName | str, config: PipelineConfig) -> bool:
    """True when the stage is sent to /sdapi/v1/extra-single-image (which has no task id)."""
    return StageName(stage) is StageName.UPSCALE and config.upscale.mode == "extras"


# ---------------------------------------------------------------------------------------------
# Payloads
# ---------------------------------------------------------------------------------------------


def build_payload(
    stage: StageName,
    job: Job,
    previous: StageResult | None,
    *,
    task_id: str,
    image_index: int | None = None,
) -> dict[str, Any]:
    """The A1111 request body of one request of ``stage`` (no network; reads the init image).

    txt2img ignores ``previous`` and ``image_index``; the other stages need both: the image
    ``previous.images[image_index]`` is sent as the init image and its seed is carried. The
    extras upscale carries no ``force_task_id`` (A1111's extras request has no such field).
    """
    stage = StageName(stage)
    config = job.config
    if stage is StageName.TXT2IMG:
        return _txt2img_payload(config, task_id)
    if previous is None or image_index is None:
        raise ValueError(f"stage {stage}: needs the previous stage's result and an image_index")
    source = _source_image(previous, image_index, stage)
    init = _read_base64(Path(source.path), stage)
    if stage is StageName.UPSCALE and config.upscale.mode == "extras":
        return {
            "image": init,
            "resize_mode": 0,
            "upscaling_resize": config.upscale.factor,
            "upscaler_1": config.upscale.upscaler,
            "show_extras_results": True,
            "gfpgan_visibility": 0,
            "codeformer_visibility": 0,
            "codeformer_weight": 0,
        }
    payload = _img2img_base(config, task_id, init, source)
    if stage is StageName.IMG2IMG:
        section = config.img2img
        payload["prompt"] = section.prompt if section.prompt is not None else config.prompt
        if section.negative_prompt is not None:
            payload["negative_prompt"] = section.negative_prompt
        payload["denoising_strength"] = section.denoising_strength
        if section.steps is not None:
            payload["steps"] = section.steps
    elif stage is StageName.ADETAILER:
        payload["denoising_strength"] = ADETAILER_IMG2IMG_DENOISING
        payload["alwayson_scripts"] = {"ADetailer": {"args": [_adetailer_unit(config)]}}
    else:  # upscale by img2img at the target size
        factor = config.upscale.factor
        payload["width"] = _multiple_of_8(source.width * factor)
        payload["height"] = _multiple_of_8(source.height * factor)
        payload["denoising_strength"] = config.upscale.denoising_strength
    return payload


def _common(config: PipelineConfig, task_id: str) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "prompt": config.prompt,
        "negative_prompt": config.negative_prompt,
        "sampler_name": config.sampler_name,
        "steps": config.steps,
        "cfg_scale": config.cfg_scale,
        "override_settings": _override_settings(config),
        "override_settings_restore_afterwards": True,
        "force_task_id": task_id,
        "send_images": True,
        "save_images": False,
    }
    if config.scheduler is not None:
        payload["scheduler"] = config.scheduler
    return payload


def _override_settings(config: PipelineConfig) -> dict[str, Any]:
    settings: dict[str, Any] = {"CLIP_stop_at_last_layers": config.clip_skip}
    if config.model is not None:
        settings["sd_model_checkpoint"] = config.model
    if config.vae is not None:
        settings["sd_vae"] = config.vae
    return settings


def _txt2img_payload(config: PipelineConfig, task_id: str) -> dict[str, Any]:
    payload = _common(config, task_id)
    payload.update(
        seed=config.seed,
        batch_size=config.batch_size,
        n_iter=config.n_iter,
        width=config.width,
        height=config.height,
    )
    if config.hires.enabled:
        payload.update(
            enable_hr=True,
            hr_scale=config.hires.scale,
            hr_upscaler=config.hires.upscaler,
            hr_second_pass_steps=config.hires.second_pass_steps,
            denoising_strength=config.hires.denoising_strength,
        )
    return payload


def _img2img_base(
    config: PipelineConfig, task_id: str, init: str, source: StageImage
) -> dict[str, Any]:
    payload = _common(config, task_id)
    payload.update(
        init_images=[init],
        resize_mode=0,
        seed=source.seed if source.seed is not None else config.seed,
        batch_size=1,
        n_iter=1,
        width=source.width,
        height=source.height,
    )
    return payload


def _adetailer_unit(config: PipelineConfig) -> dict[str, Any]:
    section = config.adetailer
    unit: dict[str, Any] = {
        "ad_model": section.model,
        "ad_prompt": section.prompt,
        "ad_negative_prompt": section.negative_prompt,
        "ad_confidence": section.confidence,
        "ad_denoising_strength": section.denoising_strength,
        "ad_mask_blur": section.mask_blur,
        "ad_inpaint_only_masked": section.inpaint_only_masked,
    }
    if section.steps is not None:
        unit.update(ad_use_steps=True, ad_steps=section.steps)
    if section.cfg_scale is not None:
        unit.update(ad_use_cfg_scale=True, ad_cfg_scale=section.cfg_scale)
    if section.sampler is not None:
        unit.update(ad_use_sampler=True, ad_sampler=section.sampler)
    return unit


def _multiple_of_8(value: float) -> int:
    """The nearest multiple of 8 (halves round up), at least 8."""
    return max(8, int(value / 8 + 0.5) * 8)


def _source_image(previous: StageResult, image_index: int, stage: StageName) -> StageImage:
    for image in previous.images:
        if image.index == image_index:
            return image
    raise ValueError(
        f"stage {stage}: the {previous.stage} stage has no image with index {image_index}"
    )


def _read_base64(path: Path, stage: StageName) -> str:
    try:
        return base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as exc:
        raise StablenewError(
            f"stage {stage}: cannot read the previous stage's image {path}: {exc.strerror}"
        ) from exc


# ---------------------------------------------------------------------------------------------
# Running a stage
# ---------------------------------------------------------------------------------------------


class _ProgressPoller:
    """Polls /internal/progress for one task beside the request that runs it.

    Reports progress through ``on_progress`` and, once ``should_stop()`` turns true, interrupts
    the WebUI -- but only while this task is the active one (never somebody else's job).
    """

    def __init__(
        self,
        client: WebUIClient,
        task_id: str,
        *,
        on_progress: ProgressCallback | None,
        should_stop: StopCheck | None,
        poll_seconds: float,
        label: str,
        done: int,
        total: int,
    ) -> None:
        self.client = client
        self.task_id = task_id
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.poll_seconds = poll_seconds
        self.label = label
        self.done = done
        self.total = total
        self.stop_requested = False
        self.interrupted = False
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-{task_id}", daemon=True)

    def __enter__(self) -> _ProgressPoller:
        if self.on_progress is not None or self.should_stop is not None:
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._finished.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._finished.wait(self.poll_seconds):
            try:
                self._poll_once()
            except WebUIError as exc:  # progress is best effort; the request itself decides
                logger.debug("progress poll for %s failed: %s", self.task_id, exc)
            except Exception:
                logger.exception("progress callback for %s failed", self.task_id)

    def _poll_once(self) -> None:
        if self.should_stop is not None and not self.stop_requested and self.should_stop():
            self.stop_requested = True
            logger.info("stop requested while %s runs", self.task_id)
        if self.stop_requested and not self.interrupted:
            self.interrupted = self.client.interrupt_task(self.task_id)
            return
        if self.on_progress is None or self.stop_requested:
            return
        state = self.client.task_progress(self.task_id)
        if state.get("active"):
            fraction = float(state.get("progress") or 0.0)
            text = f"{self.label} {self.done + 1}/{self.total}: {fraction:.0%}"
        elif state.get("queued"):
            fraction, text = (
                0.0,
                f"{self.label} {self.done + 1}/{self.total}: waiting for the WebUI",
            )
        else:
            return
        overall = (self.done + min(max(fraction, 0.0), 1.0)) / self.total
        self.on_progress(overall, text)


def run_stage(
    client: WebUIClient,
    job: Job,
    stage: StageName,
    previous: StageResult | None,
    job_dir: Path,
    *,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    poll_seconds: float = 0.5,
) -> StageResult:
    """Run one stage against the WebUI and write its images into ``job_dir``.

    ``on_progress(fraction 0..1 of this stage, text)`` may be called from a background thread.
    ``should_stop()`` is checked before each request and while it runs; when it turns true the
    running task is interrupted (only if it is ours) and :class:`JobCancelledError` is raised
    once the request has returned. WebUI errors carry ``stage``.
    """
    stage = StageName(stage)
    job_dir = Path(job_dir)
    started = utc_now()
    if stage is StageName.TXT2IMG:
        indices: list[int | None] = [None]
        carried_seeds: dict[int, int | None] = {}
    else:
        if previous is None or not previous.images:
            raise StablenewError(f"stage {stage}: the previous stage produced no images")
        indices = [image.index for image in previous.images]
        carried_seeds = {image.index: image.seed for image in previous.images}
    extras = uses_extras(stage, job.config)
    total = len(indices)
    images: list[StageImage] = []
    infos: list[dict[str, Any]] = []
    infotexts: list[str] = []
    seeds: list[int] = []
    task_ids: list[str] = []

    for number, image_index in enumerate(indices):
        if should_stop is not None and should_stop():
            raise JobCancelledError(
                f"job {job.job_id} cancelled before request {number + 1}/{total} of stage {stage}"
            )
        task_id = task_id_for(job, stage, number)
        task_ids.append(task_id)
        payload = build_payload(stage, job, previous, task_id=task_id, image_index=image_index)
        poller = _ProgressPoller(
            client,
            task_id,
            on_progress=None if extras else on_progress,
            should_stop=None if extras else should_stop,
            poll_seconds=poll_seconds,
            label=str(stage),
            done=number,
            total=total,
        )
        try:
            with poller:
                result = _send(client, stage, job.config, payload)
        except WebUIError:
            if poller.stop_requested:
                raise JobCancelledError(
                    f"job {job.job_id} cancelled during stage {stage} ({task_id})"
                ) from None
            raise
        if poller.stop_requested or (extras and should_stop is not None and should_stop()):
            raise JobCancelledError(
                f"job {job.job_id} cancelled during stage {stage} ({task_id}); "
                f"the WebUI was {'interrupted' if poller.interrupted else 'left to finish'}"
            )
        if not result.images:
            raise StablenewError(f"stage {stage}: the WebUI returned no image for {task_id}")
        if stage is StageName.TXT2IMG:
            expected = job.config.images_per_stage
            if len(result.images) > expected:  # e.g. extension previews appended at the end
                logger.warning(
                    "stage %s: the WebUI returned %d images, keeping the first %d",
                    stage,
                    len(result.images),
                    expected,
                )
            pngs = result.images[:expected]
            image_seeds: list[int | None] = [
                result.seeds[i] if i < len(result.seeds) else None for i in range(len(pngs))
            ]
            positions = list(range(len(pngs)))
            infos.append(result.info)
        else:
            assert image_index is not None
            if len(result.images) > 1:
                logger.warning(
                    "stage %s: the WebUI returned %d images for one input, keeping the first",
                    stage,
                    len(result.images),
                )
            pngs = result.images[:1]
            image_seeds = [result.seeds[0] if result.seeds else carried_seeds[image_index]]
            positions = [image_index]
            infos.append(result.info)
        texts = result.infotexts
        for offset, (png, position, seed) in enumerate(
            zip(pngs, positions, image_seeds, strict=True)
        ):
            text = texts[offset] if offset < len(texts) else _png_parameters(png)
            path = job_dir / f"{stage.value}_{position}.png"
            sha256, width, height = write_png(
                path, png, parameters=text, stablenew=stablenew_metadata(job, stage.value, position)
            )
            images.append(
                StageImage(
                    index=position,
                    path=str(path),
                    sha256=sha256,
                    seed=seed,
                    width=width,
                    height=height,
                )
            )
            if text is not None:
                infotexts.append(text)
            if seed is not None:
                seeds.append(seed)
        if on_progress is not None:
            on_progress((number + 1) / total, f"{stage} {number + 1}/{total}: done")

    info = infos[0] if stage is StageName.TXT2IMG else {"per_image": infos}
    return StageResult(
        stage=stage,
        images=images,
        seeds=seeds,
        info=info,
        infotexts=infotexts,
        task_ids=task_ids,
        started_at=started,
        finished_at=utc_now(),
    )


def _png_parameters(png: bytes) -> str | None:
    """The A1111 infotext already in a PNG (extras answers keep the input's), if any."""
    try:
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            value = image.info.get("parameters")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) else None


def _send(
    client: WebUIClient, stage: StageName, config: PipelineConfig, payload: dict[str, Any]
) -> GenerationResult:
    if stage is StageName.TXT2IMG:
        return client.txt2img(payload, stage=stage.value)
    if uses_extras(stage, config):
        return client.extra_single_image(payload, stage=stage.value)
    return client.img2img(payload, stage=stage.value)
