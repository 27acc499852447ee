"""PipelineConfig: what one job generates, stage by stage.

A pipeline is txt2img, then optionally img2img, ADetailer and upscale, each section switched on
by ``enabled``. Values are checked with messages that name the field and the bad value;
unknown fields are rejected (a misspelt field would otherwise be silently ignored by the WebUI).
``to_dict()`` gives a JSON-safe dict; :func:`redact` removes anything that looks like a secret.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SECRET_KEY_PARTS = ("password", "passwd", "secret", "token", "api_key", "apikey", "auth")
REDACTED = "***"


def redact(value: Any) -> Any:
    """A copy of ``value`` with every mapping key that names a secret replaced by ``***``."""
    if isinstance(value, dict):
        return {
            key: (REDACTED if _is_secret_key(key) else redact(item)) for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def _is_secret_key(key: object) -> bool:
    lowered = str(key).lower()
    return any(part in lowered for part in SECRET_KEY_PARTS)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class HiresConfig(_Section):
    """txt2img's own high-resolution fix (A1111 ``enable_hr``)."""

    enabled: bool = False
    scale: float = Field(default=2.0, ge=1.0, le=4.0)
    upscaler: str = "Latent"
    second_pass_steps: int = Field(default=0, ge=0, le=150)
    denoising_strength: float = Field(default=0.5, ge=0.0, le=1.0)


class Img2ImgConfig(_Section):
    """A second img2img pass on each image of the previous stage."""

    enabled: bool = False
    denoising_strength: float = Field(default=0.35, ge=0.0, le=1.0)
    steps: int | None = Field(default=None, ge=1, le=150)
    prompt: str | None = Field(default=None, description="Default: the job's prompt.")
    negative_prompt: str | None = None


class ADetailerConfig(_Section):
    """ADetailer (detect and inpaint faces or hands) as an img2img pass."""

    enabled: bool = False
    model: str = "face_yolov8n.pt"
    prompt: str = ""
    negative_prompt: str = ""
    confidence: float = Field(default=0.3, ge=0.0, le=1.0)
    denoising_strength: float = Field(default=0.4, ge=0.0, le=1.0)
    mask_blur: int = Field(default=4, ge=0, le=64)
    inpaint_only_masked: bool = True
    steps: int | None = Field(default=None, ge=1, le=150)
    cfg_scale: float | None = Field(default=None, ge=1.0, le=30.0)
    sampler: str | None = None


class UpscaleConfig(_Section):
    """Final upscale: the extras upscaler, or img2img at the target size."""

    enabled: bool = False
    mode: Literal["extras", "img2img"] = "extras"
    upscaler: str = "R-ESRGAN 4x+"
    factor: float = Field(default=2.0, ge=1.0, le=8.0)
    denoising_strength: float = Field(default=0.2, ge=0.0, le=1.0)


class PipelineConfig(BaseModel):
    """The full configuration of one job's pipeline."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prompt: str = Field(min_length=1, max_length=20000)
    negative_prompt: str = Field(default="", max_length=20000)
    model: str | None = Field(default=None, description="Checkpoint, pinned per request.")
    vae: str | None = None
    sampler_name: str = "Euler a"
    scheduler: str | None = None
    steps: int = Field(default=20, ge=1, le=150)
    cfg_scale: float = Field(default=7.0, ge=1.0, le=30.0)
    width: int = Field(default=512, ge=64, le=4096)
    height: int = Field(default=512, ge=64, le=4096)
    seed: int = Field(default=-1, ge=-1, le=2**32 - 1, description="-1 = random.")
    batch_size: int = Field(default=1, ge=1, le=16)
    n_iter: int = Field(default=1, ge=1, le=100)
    clip_skip: int = Field(default=1, ge=1, le=12)
    hires: HiresConfig = Field(default_factory=HiresConfig)
    img2img: Img2ImgConfig = Field(default_factory=Img2ImgConfig)
    adetailer: ADetailerConfig = Field(default_factory=ADetailerConfig)
    upscale: UpscaleConfig = Field(default_factory=UpscaleConfig)

    @field_validator("width", "height")
    @classmethod
    def _size_multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @model_validator(mode="after")
    def _pixels_in_range(self) -> PipelineConfig:
        pixels = self.width * self.height * self.batch_size
        if pixels > 4096 * 4096:
            raise ValueError(
                f"width x height x batch_size = {pixels} pixels is over the limit of "
                f"{4096 * 4096}; lower the size or the batch"
            )
        return self

    @property
    def images_per_stage(self) -> int:
        """How many images every stage produces: batch_size x n_iter."""
        return self.batch_size * self.n_iter

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field (secrets not removed: see :func:`redact`)."""
        return self.model_dump(mode="json")

    def config_hash(self) -> str:
        """A short stable hash of the config, for PNG metadata and caching."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]
