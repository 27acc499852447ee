"""Expanding a PromptPack into PackEntries: prompts x matrix combinations x images, seeded."""

from __future__ import annotations

import copy
import hashlib
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..config import PipelineConfig
from ..errors import ConfigError, PackError
from ._load import error_message, load_pack
from ._models import (
    DEFAULT_MAX_JOBS,
    HARD_MAX_JOBS,
    MAX_SEED,
    PackEntry,
    PackMatrix,
    PackPrompt,
    PromptPack,
    SeedMode,
)
from ._syntax import TOKEN, check_slots, slot_refs

_SEED_MODES: tuple[SeedMode, ...] = ("fixed", "increment", "random")


def expand_pack(
    pack: PromptPack,
    *,
    base: PipelineConfig | dict[str, Any] | None = None,
    images_per_prompt: int | None = None,
    seed_mode: SeedMode | None = None,
    seed: int | None = None,
    max_jobs: int = DEFAULT_MAX_JOBS,
) -> list[PackEntry]:
    """The pack's jobs, in a stable order; all of them valid, or a PackError and none.

    ``base`` holds the caller's explicit options (a PipelineConfig counts as all-explicit); they
    win over the pack's preset, which wins over PipelineConfig's defaults. The keyword
    arguments override the pack's own ``images_per_prompt``, ``seed_mode`` and ``seed``.
    Bad keyword arguments raise ConfigError.
    """
    _check_cap_argument(max_jobs)
    per_prompt = pack.images_per_prompt if images_per_prompt is None else images_per_prompt
    _check_int("images_per_prompt", per_prompt, 1, HARD_MAX_JOBS)
    mode = pack.seed_mode if seed_mode is None else seed_mode
    if mode not in _SEED_MODES:
        raise ConfigError(f"seed_mode must be one of {', '.join(_SEED_MODES)}, got {mode!r}")
    explicit = _explicit_options(base)
    start = _start_seed(pack, seed, explicit)

    slot_order = list(pack.matrix.slots)
    used_slots = [_used_slots(pack, prompt, slot_order) for prompt in pack.prompts]
    count = per_prompt * sum(_combination_count(pack.matrix, used) for used in used_slots)
    if count > max_jobs:
        hint = (
            "the hard cap"
            if max_jobs >= HARD_MAX_JOBS
            else f"raise it with max_jobs= up to {HARD_MAX_JOBS}"
        )
        raise PackError(
            f"{pack.path}: expands to {count} jobs, over the cap of {max_jobs} ({hint}; or "
            "lower images_per_prompt, the matrix limit or the number of prompts)"
        )

    settings = _merge(pack.preset, explicit)
    settings.pop("prompt", None)
    settings.pop("seed", None)
    base_negative = settings.pop("negative_prompt", "") or ""
    seeds = _seeds(mode, start, count)

    entries: list[PackEntry] = []
    for prompt_index, (prompt, used) in enumerate(zip(pack.prompts, used_slots, strict=True)):
        picks = _wildcard_picks(pack, prompt, start, prompt_index)
        for variant in _combinations(pack.matrix, used, start, prompt_index):
            filled = iter(picks)
            text = _fill(prompt.text, variant, filled)
            negative = ", ".join(
                part for part in (base_negative, _fill(prompt.negative, variant, filled)) if part
            )
            for image_index in range(per_prompt):
                index = len(entries)
                values = {
                    **copy.deepcopy(settings),
                    "prompt": text,
                    "negative_prompt": negative,
                    "seed": seeds[index],
                }
                config = _validate(pack, prompt, index, variant, values, explicit)
                entries.append(
                    PackEntry(
                        pack_id=pack.pack_id,
                        index=index,
                        prompt_index=prompt_index,
                        image_index=image_index,
                        variant=variant,
                        config=config,
                    )
                )
    return entries


def load_and_expand(
    path: str | Path,
    *,
    base: PipelineConfig | dict[str, Any] | None = None,
    images_per_prompt: int | None = None,
    seed_mode: SeedMode | None = None,
    seed: int | None = None,
    max_jobs: int = DEFAULT_MAX_JOBS,
) -> list[PackEntry]:
    """:func:`load_pack` then :func:`expand_pack`."""
    return expand_pack(
        load_pack(path),
        base=base,
        images_per_prompt=images_per_prompt,
        seed_mode=seed_mode,
        seed=seed,
        max_jobs=max_jobs,
    )


def derive(*parts: object) -> int:
    """A stable 64-bit integer from the parts (the same on every run and platform)."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


# --- arguments -------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {value!r}")


def _check_cap_argument(max_jobs: object) -> None:
    if isinstance(max_jobs, int) and not isinstance(max_jobs, bool) and max_jobs > HARD_MAX_JOBS:
        raise ConfigError(f"max_jobs={max_jobs} is over the hard cap of {HARD_MAX_JOBS}")
    _check_int("max_jobs", max_jobs, 1, HARD_MAX_JOBS)


def _explicit_options(base: PipelineConfig | dict[str, Any] | None) -> dict[str, Any]:
    if base is None:
        return {}
    if isinstance(base, PipelineConfig):
        return base.model_dump()
    if isinstance(base, dict):
        return copy.deepcopy(base)
    raise ConfigError(f"base must be a PipelineConfig, a dict or None, got {type(base).__name__}")


def _start_seed(pack: PromptPack, seed: int | None, explicit: dict[str, Any]) -> int:
    """seed= > the caller's base seed (unless -1) > the pack's seed; -1 -> from the content."""
    if seed is not None:
        _check_int("seed", seed, -1, MAX_SEED)
        start = seed
    elif "seed" in explicit and explicit["seed"] != -1:
        _check_int("base seed", explicit["seed"], -1, MAX_SEED)
        start = explicit["seed"]
    else:
        start = pack.seed
    if start == -1:
        start = derive("pack-seed", pack.fingerprint()) % (MAX_SEED + 1)
    return start


def _merge(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """``high`` over ``low``; nested dicts merged key by key (sections may be partial)."""
    merged = copy.deepcopy(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --- matrix, wildcards, seeds ----------------------------------------------------------------


def _used_slots(pack: PromptPack, prompt: PackPrompt, slot_order: list[str]) -> list[str]:
    for template in (prompt.text, prompt.negative):
        problem = check_slots(template, slot_order)
        if problem:
            raise PackError(f"{pack.path}, {prompt.where or 'prompt'}: {problem}")
    used = slot_refs(prompt.text, prompt.negative)
    return [slot for slot in slot_order if slot in used]


def _combination_count(matrix: PackMatrix, used: list[str]) -> int:
    total = math.prod(len(matrix.slots[slot]) for slot in used)
    return total if matrix.limit is None else min(matrix.limit, total)


def _combinations(
    matrix: PackMatrix, used: list[str], start: int, prompt_index: int
) -> list[dict[str, str]]:
    """The prompt's combinations of its slots: the first slot varies slowest."""
    if not used:
        return [{}]
    total = math.prod(len(matrix.slots[slot]) for slot in used)
    wanted = _combination_count(matrix, used)
    if matrix.mode == "random":
        rng = random.Random(derive("matrix", start, prompt_index))
        numbers: list[int] | range = sorted(rng.sample(range(total), wanted))
    else:
        numbers = range(wanted)
    combinations = []
    for number in numbers:
        variant: dict[str, str] = {}
        for slot in reversed(used):
            values = matrix.slots[slot]
            number, position = divmod(number, len(values))
            variant[slot] = values[position]
        combinations.append({slot: variant[slot] for slot in used})
    return combinations


def _wildcard_picks(
    pack: PromptPack, prompt: PackPrompt, start: int, prompt_index: int
) -> list[str]:
    """One value per wildcard occurrence (text, then negative), the same for all variants."""
    rng = random.Random(derive("wildcards", start, prompt_index))
    picks = []
    for template in (prompt.text, prompt.negative):
        for match in TOKEN.finditer(template):
            name = match.group("wildcard")
            if name is None:
                continue
            values = pack.wildcards.get(name)
            if not values:
                raise PackError(
                    f"{pack.path}, {prompt.where or 'prompt'}: unknown wildcard __{name}__ "
                    "(the pack has no values for it)"
                )
            picks.append(rng.choice(values))
    return picks


def _fill(template: str, variant: dict[str, str], picks: Iterator[str]) -> str:
    """Slots and wildcards replaced in one pass: inserted values are not scanned again."""

    def replace(match: Any) -> str:
        slot = match.group("slot")
        return variant[slot] if slot is not None else next(picks)

    return TOKEN.sub(replace, template)


def _seeds(mode: SeedMode, start: int, count: int) -> list[int]:
    if mode == "fixed":
        return [start] * count
    if mode == "increment":
        return [(start + index) % (MAX_SEED + 1) for index in range(count)]
    rng = random.Random(derive("seeds", start))
    return [rng.randrange(MAX_SEED + 1) for _ in range(count)]


# --- validation ------------------------------------------------------------------------------


def _validate(
    pack: PromptPack,
    prompt: PackPrompt,
    index: int,
    variant: dict[str, str],
    values: dict[str, Any],
    explicit: dict[str, Any],
) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = ".".join(str(part) for part in error["loc"])
            top = error["loc"][0] if error["loc"] else None
            if top in ("prompt", "negative_prompt"):
                source = "the expanded prompt"
            elif top in explicit:
                source = "the caller's options"
            elif top in pack.preset:
                source = "the pack preset"
            else:
                source = "the combined config"
            field = f"{loc}: " if loc else ""
            problems.append(f"{field}{error_message(error)} (from {source})")
        where = prompt.where or f"prompt {pack.prompts.index(prompt)}"
        shown_variant = f", variant {variant}" if variant else ""
        raise PackError(
            f"{pack.path}, {where}: job {index}{shown_variant} has an invalid config: "
            + "; ".join(problems)
        ) from None
