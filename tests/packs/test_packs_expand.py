"""Expansion: order, matrix modes, wildcards, seeds, caps, precedence, all-or-nothing."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stablenew_core.config import PipelineConfig
from stablenew_core.errors import ConfigError, PackError
from stablenew_core.packs import (
    DEFAULT_MAX_JOBS,
    HARD_MAX_JOBS,
    PackEntry,
    PackPrompt,
    PromptPack,
    expand_pack,
    load_and_expand,
    load_pack,
)

WritePack = Callable[[str, Any], Path]
WriteWildcard = Callable[[str, str], Path]


def dumps(entries: list[PackEntry]) -> list[dict[str, Any]]:
    return [entry.model_dump(mode="json") for entry in entries]


def test_txt_fixture_expands(fixtures: Path) -> None:
    entries = load_and_expand(fixtures / "portraits.txt")
    assert [(e.index, e.prompt_index, e.image_index) for e in entries] == [
        (0, 0, 0),
        (1, 0, 0),
        (2, 0, 0),
        (3, 0, 0),
        (4, 1, 0),
    ]
    assert [e.variant for e in entries] == [
        {"style": "oil painting", "light": "dawn"},
        {"style": "oil painting", "light": "dusk"},
        {"style": "watercolor", "light": "dawn"},
        {"style": "watercolor", "light": "dusk"},
        {},
    ]
    assert all(e.pack_id == "portraits" for e in entries)
    assert all(isinstance(e.config, PipelineConfig) for e in entries)
    assert [e.config.seed for e in entries] == [1000, 1001, 1002, 1003, 1004]
    assert all(e.config.steps == 28 and e.config.hires.enabled for e in entries)
    first = entries[0].config
    animal = first.prompt.split()[3]
    assert animal in {"cat", "fox", "owl"}
    assert first.prompt == (
        f"portrait of a {animal} knight, oil painting, <lora:detail_tweaker:0.6> at dawn"
    )
    assert first.negative_prompt == "blurry, lowres"
    # One wildcard pick per prompt, shared by all its combinations.
    assert all(f"a {animal} knight" in e.config.prompt for e in entries[:4])
    assert entries[4].config.prompt.endswith(", <embedding:fancy_eyes>")
    assert entries[4].config.negative_prompt == "watermark"


def test_json_fixture_expands(fixtures: Path) -> None:
    entries = load_and_expand(fixtures / "landscapes.json")
    assert len(entries) == 2 * 3 * 2
    assert [e.config.seed for e in entries] == list(range(7, 7 + 12))
    assert [(e.prompt_index, e.variant["time"], e.image_index) for e in entries[:6]] == [
        (0, "morning", 0),
        (0, "morning", 1),
        (0, "noon", 0),
        (0, "noon", 1),
        (0, "night", 0),
        (0, "night", 1),
    ]
    assert entries[0].config.prompt == "a quiet lake at morning"
    assert entries[0].config.negative_prompt == "bad anatomy"
    last = entries[-1].config
    assert last.prompt.startswith("a mountain village, night, ")
    assert last.prompt.endswith(" in the street, <lora:scenery:0.8>, <lora:sharp:1>, good_hands")
    assert last.negative_prompt == "bad anatomy, people"
    assert (last.steps, last.hires.scale) == (30, 1.5)


def test_expansion_is_deterministic(fixtures: Path) -> None:
    for name in ("portraits.txt", "landscapes.json"):
        first = load_and_expand(fixtures / name, seed_mode="random")
        second = load_and_expand(fixtures / name, seed_mode="random")
        assert dumps(first) == dumps(second)
        assert load_pack(fixtures / name) == load_pack(fixtures / name)


def test_load_and_expand_equals_expand_of_load(fixtures: Path) -> None:
    path = fixtures / "landscapes.json"
    kwargs: dict[str, Any] = {"images_per_prompt": 1, "seed": 5, "base": {"steps": 9}}
    assert dumps(load_and_expand(path, **kwargs)) == dumps(expand_pack(load_pack(path), **kwargs))


# --- matrix -------------------------------------------------------------------------------------

MATRIX = "@matrix a: a1 | a2 | a3\n@matrix b: b1 | b2\n@matrix c: c1 | c2\n"


def test_fanout_is_the_cartesian_product_in_declaration_order(write_pack: WritePack) -> None:
    entries = load_and_expand(write_pack("m.txt", MATRIX + "\n[[c]] [[a]] [[b]]\n"))
    expected = [
        {"a": a, "b": b, "c": c}
        for a, b, c in itertools.product(["a1", "a2", "a3"], ["b1", "b2"], ["c1", "c2"])
    ]
    assert [e.variant for e in entries] == expected
    assert [e.config.prompt for e in entries] == [f"{v['c']} {v['a']} {v['b']}" for v in expected]


def test_fanout_limit_keeps_the_first_combinations(write_pack: WritePack) -> None:
    entries = load_and_expand(
        write_pack("m.txt", MATRIX + "@matrix_limit 5\n\n[[a]] [[b]] [[c]]\n")
    )
    all_variants = [
        e.variant for e in load_and_expand(write_pack("all.txt", MATRIX + "\n[[a]] [[b]] [[c]]\n"))
    ]
    assert [e.variant for e in entries] == all_variants[:5]


def test_combinations_range_only_over_the_slots_a_prompt_uses(write_pack: WritePack) -> None:
    text = MATRIX + "\nonly [[b]]\n\nnone\n\nneg side\nneg: [[c]]\n"
    entries = load_and_expand(write_pack("m.txt", text))
    assert [(e.prompt_index, e.variant) for e in entries] == [
        (0, {"b": "b1"}),
        (0, {"b": "b2"}),
        (1, {}),
        (2, {"c": "c1"}),
        (2, {"c": "c2"}),
    ]
    assert entries[4].config.negative_prompt == "c2"


def test_random_mode_draws_limit_distinct_combinations(write_pack: WritePack) -> None:
    path = write_pack(
        "r.txt", MATRIX + "@matrix_mode random\n@matrix_limit 4\n@seed 11\n\n[[a]] [[b]] [[c]]\n"
    )
    entries = load_and_expand(path)
    variants = [e.variant for e in entries]
    fanout_order = [
        {"a": a, "b": b, "c": c}
        for a, b, c in itertools.product(["a1", "a2", "a3"], ["b1", "b2"], ["c1", "c2"])
    ]
    assert len(variants) == 4
    assert all(v in fanout_order for v in variants)
    assert len({tuple(v.items()) for v in variants}) == 4
    # Kept in fanout order, and the same draw every time.
    assert variants == sorted(variants, key=fanout_order.index)
    assert variants == [e.variant for e in load_and_expand(path)]
    # Another seed draws (over a few seeds, at least once) another set.
    draws = {
        tuple(tuple(e.variant.items()) for e in load_and_expand(path, seed=s)) for s in range(8)
    }
    assert len(draws) > 1


def test_random_mode_limit_above_total_takes_every_combination(write_pack: WritePack) -> None:
    path = write_pack(
        "r.json",
        {
            "prompts": ["[[a]]"],
            "matrix": {"slots": {"a": ["x", "y"]}, "mode": "random", "limit": 50},
        },
    )
    assert [e.variant for e in load_and_expand(path)] == [{"a": "x"}, {"a": "y"}]


def test_inserted_values_are_not_scanned_again(
    write_pack: WritePack, write_wildcard: WriteWildcard
) -> None:
    write_wildcard("w", "has [[s]] inside\n")
    path = write_pack("p.txt", "@matrix s: __w__ | plain\n\n[[s]] and __w__\n")
    prompts = [e.config.prompt for e in load_and_expand(path)]
    assert prompts == ["__w__ and has [[s]] inside", "plain and has [[s]] inside"]


# --- wildcards ----------------------------------------------------------------------------------


def test_wildcards_are_seeded_per_prompt(
    write_pack: WritePack, write_wildcard: WriteWildcard
) -> None:
    write_wildcard("n", "\n".join(str(i) for i in range(100)) + "\n")
    path = write_pack("w.txt", "__n__ __n__\n@images_per_prompt 3\n\n__n__\n")
    entries = load_and_expand(path, seed=1)
    first = entries[0].config.prompt
    assert all(e.config.prompt == first for e in entries[:3])
    assert all(value in [str(i) for i in range(100)] for value in first.split())
    assert dumps(entries) == dumps(load_and_expand(path, seed=1))
    picks = {load_and_expand(path, seed=s)[0].config.prompt for s in range(10)}
    assert len(picks) > 1


# --- seeds --------------------------------------------------------------------------------------

SEEDS = "@images_per_prompt 3\n@matrix s: x | y\n\n[[s]]\n\nplain\n"


def test_seed_fixed(write_pack: WritePack) -> None:
    entries = load_and_expand(write_pack("s.txt", SEEDS + "@seed_mode fixed\n@seed 77\n"))
    assert [e.config.seed for e in entries] == [77] * 9


def test_seed_increment_and_wrap(write_pack: WritePack) -> None:
    path = write_pack("s.txt", SEEDS)
    assert [e.config.seed for e in load_and_expand(path, seed=10)] == list(range(10, 19))
    wrapped = [e.config.seed for e in load_and_expand(path, seed=2**32 - 2)]
    assert wrapped == [2**32 - 2, 2**32 - 1, *range(7)]


def test_seed_random_is_deterministic_and_in_range(write_pack: WritePack) -> None:
    path = write_pack("s.txt", SEEDS + "@seed_mode random\n@seed 5\n")
    seeds = [e.config.seed for e in load_and_expand(path)]
    assert seeds == [e.config.seed for e in load_and_expand(path)]
    assert all(0 <= s <= 2**32 - 1 for s in seeds)
    assert len(set(seeds)) == len(seeds)
    assert seeds != [e.config.seed for e in load_and_expand(path, seed=6)]


@pytest.mark.parametrize("mode", ["fixed", "increment", "random"])
def test_seed_minus_one_derives_from_content(write_pack: WritePack, mode: str) -> None:
    path = write_pack("s.txt", SEEDS)
    seeds = [e.config.seed for e in load_and_expand(path, seed_mode=mode)]  # type: ignore[arg-type]
    assert all(0 <= s <= 2**32 - 1 for s in seeds)
    assert seeds == [e.config.seed for e in load_and_expand(path, seed_mode=mode)]  # type: ignore[arg-type]
    # A comment or a move does not change the content; another prompt does.
    moved = write_pack("other_name.txt", "# a comment\n" + SEEDS)
    assert seeds == [e.config.seed for e in load_and_expand(moved, seed_mode=mode)]  # type: ignore[arg-type]
    changed = write_pack("changed.txt", SEEDS + "\nanother prompt\n")
    assert seeds[0] != load_and_expand(changed, seed_mode=mode)[0].config.seed  # type: ignore[arg-type]


def test_seed_precedence(write_pack: WritePack) -> None:
    path = write_pack("s.txt", "@seed 100\n@seed_mode fixed\n\nx\n")
    assert load_and_expand(path)[0].config.seed == 100
    assert load_and_expand(path, base={"seed": 200})[0].config.seed == 200
    assert load_and_expand(path, base={"seed": -1})[0].config.seed == 100
    assert load_and_expand(path, base={"seed": 200}, seed=300)[0].config.seed == 300
    assert load_and_expand(path, base=PipelineConfig(prompt="p"))[0].config.seed == 100
    assert load_and_expand(path, base=PipelineConfig(prompt="p", seed=9))[0].config.seed == 9


def test_keyword_overrides_beat_the_pack(write_pack: WritePack) -> None:
    path = write_pack("k.txt", "@images_per_prompt 4\n@seed_mode fixed\n@seed 1\n\nx\n")
    entries = load_and_expand(path, images_per_prompt=2, seed_mode="increment", seed=50)
    assert [e.config.seed for e in entries] == [50, 51]


# --- caps ---------------------------------------------------------------------------------------


def test_default_cap(write_pack: WritePack) -> None:
    path = write_pack("cap.txt", "@images_per_prompt 256\n\na\n\nb\n")
    assert len(load_and_expand(path)) == DEFAULT_MAX_JOBS == 512
    over = write_pack("over.txt", "@images_per_prompt 171\n\na\n\nb\n\nc\n")
    with pytest.raises(PackError) as caught:
        load_and_expand(over)
    message = str(caught.value)
    assert message.startswith(f"{over}: expands to 513 jobs, over the cap of 512")
    assert "max_jobs=" in message


def test_raised_cap(write_pack: WritePack) -> None:
    path = write_pack("over.txt", "@images_per_prompt 171\n\na\n\nb\n\nc\n")
    assert len(load_and_expand(path, max_jobs=513)) == 513
    with pytest.raises(PackError, match=r"expands to 513 jobs, over the cap of 100"):
        load_and_expand(path, max_jobs=100)


def test_hard_cap(write_pack: WritePack) -> None:
    path = write_pack("huge.txt", "@images_per_prompt 4097\n\na\n\nb\n")
    with pytest.raises(PackError) as caught:
        load_and_expand(path, max_jobs=HARD_MAX_JOBS)
    message = str(caught.value)
    assert str(path) in message
    assert "8194 jobs, over the cap of 8192 (the hard cap" in message
    with pytest.raises(ConfigError, match="max_jobs=8193 is over the hard cap of 8192"):
        load_and_expand(path, max_jobs=HARD_MAX_JOBS + 1)


def test_hard_cap_is_reachable(write_pack: WritePack) -> None:
    path = write_pack("max.txt", "@images_per_prompt 4096\n@seed 1\n\na\n\nb\n")
    entries = load_and_expand(path, max_jobs=HARD_MAX_JOBS)
    assert len(entries) == HARD_MAX_JOBS
    assert entries[-1].index == HARD_MAX_JOBS - 1


def test_cap_counts_huge_matrices_without_building_them(write_pack: WritePack) -> None:
    slots = "".join(
        f"@matrix s{i}: " + " | ".join(f"v{j}" for j in range(10)) + "\n" for i in range(12)
    )
    prompt = " ".join(f"[[s{i}]]" for i in range(12))
    with pytest.raises(PackError, match=r"expands to 1000000000000 jobs"):
        load_and_expand(write_pack("big.txt", slots + "\n" + prompt + "\n"))


@pytest.mark.parametrize(
    ("kwargs", "cause"),
    [
        ({"max_jobs": 0}, "max_jobs must be"),
        ({"images_per_prompt": 0}, "images_per_prompt must be"),
        ({"images_per_prompt": True}, "images_per_prompt must be"),
        ({"seed_mode": "often"}, "seed_mode must be one of"),
        ({"seed": 2**32}, "seed must be"),
        ({"base": {"seed": "7"}}, "base seed must be"),
        ({"base": ["steps", 3]}, "base must be a PipelineConfig, a dict or None"),
    ],
)
def test_bad_arguments_are_config_errors(
    fixtures: Path, kwargs: dict[str, Any], cause: str
) -> None:
    with pytest.raises(ConfigError, match=cause):
        load_and_expand(fixtures / "portraits.txt", **kwargs)


# --- precedence ---------------------------------------------------------------------------------

PRESET = (
    "@preset steps: 30\n@preset cfg_scale: 5\n@preset negative_prompt: lowres\n"
    '@preset hires: {"enabled": true, "scale": 1.5}\n\na cat\nneg: blurry\n'
)


def test_defaults_below_preset_below_explicit_base(write_pack: WritePack) -> None:
    path = write_pack("p.txt", PRESET)
    plain = load_and_expand(path)[0].config
    assert (plain.steps, plain.cfg_scale, plain.width) == (30, 5.0, 512)
    assert (plain.hires.enabled, plain.hires.scale) == (True, 1.5)
    assert plain.negative_prompt == "lowres, blurry"

    config = load_and_expand(
        path, base={"steps": 40, "width": 768, "hires": {"scale": 2.0}, "negative_prompt": "bad"}
    )[0].config
    assert (config.steps, config.cfg_scale, config.width) == (40, 5.0, 768)
    assert (config.hires.enabled, config.hires.scale) == (True, 2.0)
    assert config.negative_prompt == "bad, blurry"
    assert config.prompt == "a cat"


def test_a_pipeline_config_base_counts_as_all_explicit(write_pack: WritePack) -> None:
    base = PipelineConfig(prompt="ignored", negative_prompt="", steps=12)
    config = load_and_expand(write_pack("p.txt", PRESET), base=base)[0].config
    assert (config.steps, config.cfg_scale, config.hires.enabled) == (12, 7.0, False)
    assert config.prompt == "a cat"
    assert config.negative_prompt == "blurry"


def test_entries_do_not_share_nested_sections(write_pack: WritePack) -> None:
    entries = load_and_expand(write_pack("p.txt", PRESET + "@images_per_prompt 2\n"))
    entries[0].config.hires.scale = 3.0
    assert entries[1].config.hires.scale == 1.5


# --- all or nothing -----------------------------------------------------------------------------


def test_one_invalid_entry_fails_the_whole_pack(write_pack: WritePack) -> None:
    long_value = "y" * 20000
    path = write_pack("long.txt", f"ok prompt\n\n@matrix s: short | {long_value}\n[[s]] x\n")
    with pytest.raises(PackError) as caught:
        load_and_expand(path)
    message = str(caught.value)
    assert message.startswith(f"{path}, line 4: job 2, variant")
    assert (
        "prompt: String should have at most 20000 characters (from the expanded prompt)" in message
    )


def test_invalid_combination_of_base_and_preset(write_pack: WritePack) -> None:
    path = write_pack("px.txt", "@preset batch_size: 2\n\nx\n")
    with pytest.raises(PackError) as caught:
        load_and_expand(path, base={"width": 4096, "height": 4096})
    message = str(caught.value)
    assert message.startswith(f"{path}, line 3: job 0 has an invalid config: ")
    assert "pixels is over the limit" in message
    assert "(from the combined config)" in message


def test_invalid_base_is_named_as_the_callers(fixtures: Path) -> None:
    with pytest.raises(PackError) as caught:
        load_and_expand(fixtures / "landscapes.json", base={"stepz": 3, "cfg_scale": 0})
    message = str(caught.value)
    assert "landscapes.json, $.prompts[0]: job 0" in message
    assert "stepz: Extra inputs are not permitted (from the caller's options)" in message
    assert (
        "cfg_scale: Input should be greater than or equal to 1 (from the caller's options)"
        in message
    )


def test_hand_built_pack_is_checked_at_expansion(tmp_path: Path) -> None:
    def pack(text: str) -> PromptPack:
        return PromptPack(
            pack_id="hand", path=tmp_path / "hand.txt", name="hand", prompts=[PackPrompt(text=text)]
        )

    assert expand_pack(pack("plain"))[0].config.prompt == "plain"
    with pytest.raises(PackError, match=r"hand\.txt, prompt: unknown matrix slot \[\[s\]\]"):
        expand_pack(pack("[[s]]"))
    with pytest.raises(PackError, match=r"hand\.txt, prompt: unknown wildcard __w__"):
        expand_pack(pack("__w__"))
