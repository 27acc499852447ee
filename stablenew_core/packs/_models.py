"""The prompt-pack models: the parsed pack, one expanded entry, and the published .json format."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from ..config import PipelineConfig

SeedMode = Literal["fixed", "increment", "random"]
MatrixMode = Literal["fanout", "random"]

DEFAULT_MAX_JOBS = 512
HARD_MAX_JOBS = 8192
MAX_SEED = 2**32 - 1

# Preset keys a pack may not set: the prompt comes from the pack's prompts, the seed from the
# pack's top-level ``seed`` / ``seed_mode``.
RESERVED_PRESET_KEYS: dict[str, str] = {
    "prompt": "the prompt comes from the pack's prompts",
    "seed": "set the pack's seed and seed_mode instead",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PackMatrix(_Model):
    """Matrix slots filled into ``[[slot]]`` tokens, and how their combinations are chosen."""

    slots: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Slot name -> its values; a prompt's [[slot]] token takes each value.",
    )
    mode: MatrixMode = Field(
        default="fanout",
        description="fanout: every combination (cartesian product, stable order); "
        "random: `limit` distinct combinations drawn with the pack's seeded RNG.",
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        description="At most this many combinations per prompt (required for mode random).",
    )


class PackPrompt(_Model):
    """One prompt of a pack, tokens (``[[slot]]``, ``__wildcard__``) not yet filled in."""

    text: str
    negative: str = ""
    source_line: int | None = Field(default=None, description="1-based line in a .txt pack.")
    json_path: str | None = Field(default=None, description="e.g. $.prompts[3] in a .json pack.")

    @property
    def where(self) -> str:
        """Where the prompt was written: ``line 7`` or ``$.prompts[3]`` (or ``""``)."""
        if self.source_line is not None:
            return f"line {self.source_line}"
        return self.json_path or ""


class PromptPack(_Model):
    """A parsed and validated prompt pack (see :func:`stablenew_core.packs.load_pack`)."""

    pack_id: str = Field(description="The pack file's stem.")
    path: Path
    name: str
    prompts: list[PackPrompt] = Field(min_length=1)
    matrix: PackMatrix = Field(default_factory=PackMatrix)
    preset: dict[str, Any] = Field(
        default_factory=dict, description="Partial PipelineConfig fields (validated on load)."
    )
    images_per_prompt: int = Field(default=1, ge=1, le=HARD_MAX_JOBS)
    seed_mode: SeedMode = "increment"
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED, description="-1: derived from content.")
    wildcards: dict[str, list[str]] = Field(
        default_factory=dict, description="Values of every wildcard the pack's prompts use."
    )

    def fingerprint(self) -> str:
        """A hash of what the pack generates (not its path, id, name or seed).

        Seed -1 derives the start seed from it, so moving, renaming or re-commenting a pack
        keeps its images; changing a prompt, the matrix, the preset or a wildcard value does not.
        """
        content = {
            "prompts": [[prompt.text, prompt.negative] for prompt in self.prompts],
            "matrix": self.matrix.model_dump(mode="json"),
            "preset": self.preset,
            "images_per_prompt": self.images_per_prompt,
            "seed_mode": self.seed_mode,
            "wildcards": self.wildcards,
        }
        text = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()


class PackEntry(_Model):
    """One job of an expanded pack: which prompt and variant, and its full config."""

    pack_id: str
    index: int = Field(ge=0, description="Position in the expansion, 0-based.")
    prompt_index: int = Field(ge=0, description="Index into PromptPack.prompts.")
    image_index: int = Field(default=0, ge=0, description="0 .. images_per_prompt - 1.")
    variant: dict[str, str] = Field(default_factory=dict, description="Matrix slot -> value.")
    config: PipelineConfig


# --- The published .json format --------------------------------------------------------------

_TEXT_TAG = "prompt-string"
_OBJECT_TAG = "prompt-object"
UNION_TAGS = frozenset({_TEXT_TAG, _OBJECT_TAG})


def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return _TEXT_TAG
    if isinstance(value, dict | JsonPrompt):
        return _OBJECT_TAG
    return None


class JsonLora(_Model):
    """A LoRA appended to the prompt as ``<lora:name:weight>``."""

    name: str = Field(min_length=1)
    weight: float = Field(default=1.0, allow_inf_nan=False)


class JsonPrompt(_Model):
    """A prompt with its own negative prompt, LoRAs and embeddings."""

    prompt: str
    negative: str = ""
    loras: list[JsonLora] = Field(default_factory=list)
    embeddings: list[str] = Field(
        default_factory=list, description="Embedding names appended to the prompt."
    )


JsonPromptItem = Annotated[
    Annotated[str, Tag(_TEXT_TAG)] | Annotated[JsonPrompt, Tag(_OBJECT_TAG)],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_type",
        custom_error_message="expected a string or an object {prompt, negative, loras, embeddings}",
    ),
]


class JsonPack(_Model):
    """A prompt pack in .json form (the published schema is generated from this model)."""

    schema_ref: str | None = Field(
        default=None, alias="$schema", description="Optional: the URL or path of this schema."
    )
    name: str | None = Field(default=None, description="Default: the file's stem.")
    prompts: list[JsonPromptItem]
    matrix: PackMatrix = Field(default_factory=PackMatrix)
    preset: dict[str, Any] = Field(
        default_factory=dict,
        description="Partial PipelineConfig: defaults < preset < the caller's explicit options.",
    )
    images_per_prompt: int = Field(default=1, ge=1, le=HARD_MAX_JOBS)
    seed_mode: SeedMode = "increment"
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED)


def pack_json_schema() -> dict[str, Any]:
    """The JSON Schema of the .json pack format (committed as ``schemas/pack.schema.json``).

    Generated from :class:`JsonPack`; ``preset`` is described by PipelineConfig's own schema
    with nothing required and without the reserved ``prompt`` and ``seed`` keys.
    """
    schema = JsonPack.model_json_schema(by_alias=True)
    config_schema = copy.deepcopy(PipelineConfig.model_json_schema())
    defs = schema.setdefault("$defs", {})
    defs.update(config_schema.pop("$defs", {}))
    config_schema.pop("required", None)
    for key in RESERVED_PRESET_KEYS:
        config_schema["properties"].pop(key, None)
    config_schema["title"] = "PipelinePreset"
    config_schema["description"] = (
        "Any PipelineConfig fields except prompt and seed; nested sections may be partial."
    )
    defs["PipelinePreset"] = config_schema
    preset = schema["properties"]["preset"]
    schema["properties"]["preset"] = {
        "$ref": "#/$defs/PipelinePreset",
        "description": preset.get("description", ""),
        "default": {},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "StableNew prompt pack",
        **{key: value for key, value in schema.items() if key != "title"},
    }


SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "pack.schema.json"


def render_pack_schema() -> str:
    """:func:`pack_json_schema` as the text committed in ``schemas/pack.schema.json``."""
    return json.dumps(pack_json_schema(), indent=2, ensure_ascii=False) + "\n"
