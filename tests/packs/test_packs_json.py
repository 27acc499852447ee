"""The .json pack format: parsing, LoRA/embedding appending, errors by JSON path, the schema."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stablenew_core.errors import PackError
from stablenew_core.packs import PackMatrix, load_pack, pack_json_schema
from stablenew_core.packs._models import SCHEMA_PATH, render_pack_schema

WritePack = Callable[[str, Any], Path]
WriteWildcard = Callable[[str, str], Path]


def test_fixture_pack_loads(fixtures: Path) -> None:
    pack = load_pack(fixtures / "landscapes.json")
    assert pack.pack_id == "landscapes"
    assert pack.name == "Landscapes"
    assert [p.text for p in pack.prompts] == [
        "a quiet lake at [[time]]",
        "a mountain village, [[time]], __animal__ in the street, <lora:scenery:0.8>, "
        "<lora:sharp:1>, good_hands",
    ]
    assert [p.negative for p in pack.prompts] == ["", "people"]
    assert [p.json_path for p in pack.prompts] == ["$.prompts[0]", "$.prompts[1]"]
    assert [p.source_line for p in pack.prompts] == [None, None]
    assert pack.matrix == PackMatrix(slots={"time": ["morning", "noon", "night"]})
    assert pack.preset == {"steps": 30, "negative_prompt": "bad anatomy", "hires": {"scale": 1.5}}
    assert (pack.images_per_prompt, pack.seed_mode, pack.seed) == (2, "increment", 7)
    assert pack.wildcards == {"animal": ["cat", "fox", "owl"]}


def test_minimal_pack_defaults(write_pack: WritePack) -> None:
    pack = load_pack(write_pack("tiny.json", {"prompts": ["a cat"]}))
    assert pack.name == "tiny"
    assert pack.prompts[0].text == "a cat"
    assert (pack.images_per_prompt, pack.seed_mode, pack.seed) == (1, "increment", -1)
    assert pack.matrix == PackMatrix()
    assert pack.preset == {}


def test_lora_weight_formats_as_a1111_writes_it(write_pack: WritePack) -> None:
    prompt = {
        "prompt": "x",
        "loras": [{"name": "a", "weight": 2}, {"name": "b"}, {"name": "c", "weight": -0.25}],
    }
    pack = load_pack(write_pack("l.json", {"prompts": [prompt]}))
    assert pack.prompts[0].text == "x, <lora:a:2>, <lora:b:1>, <lora:c:-0.25>"


def _prompts(*items: Any) -> dict[str, Any]:
    return {"prompts": list(items)}


# Every error names the file, the JSON path and the cause.
JSON_ERRORS = [
    pytest.param({"prompts": []}, "$.prompts", "no prompts", id="no-prompts"),
    pytest.param({}, "$.prompts", "missing (required)", id="missing-prompts"),
    pytest.param(_prompts("a", "  "), "$.prompts[1]", "empty prompt", id="empty-prompt"),
    pytest.param(_prompts({"prompt": ""}), "$.prompts[0].prompt", "empty prompt", id="empty-obj"),
    pytest.param(
        _prompts("a", "b", "c", {"prompt": "d", "loras": [{"name": "x", "weight": "heavy"}]}),
        "$.prompts[3].loras[0].weight",
        "Input should be a valid number",
        id="lora-weight",
    ),
    pytest.param(
        _prompts({"prompt": "d", "loras": [{"name": "x", "weight": True}]}),
        "$.prompts[0].loras[0].weight",
        "valid number",
        id="lora-weight-bool",
    ),
    pytest.param(
        _prompts({"prompt": "d", "loras": [{"name": "a:b"}]}),
        "$.prompts[0].loras[0].name",
        "bad lora name 'a:b'",
        id="lora-name",
    ),
    pytest.param(
        _prompts({"prompt": "d", "loras": [{"name": ""}]}),
        "$.prompts[0].loras[0].name",
        "at least 1 character",
        id="lora-name-empty",
    ),
    pytest.param(
        _prompts({"prompt": "d", "embeddings": ["ok", "two words"]}),
        "$.prompts[0].embeddings[1]",
        "bad embedding name 'two words'",
        id="embedding",
    ),
    pytest.param(
        _prompts("ok", 5), "$.prompts[1]", "expected a string or an object", id="prompt-type"
    ),
    pytest.param(
        _prompts({"prompt": "x", "weight": 1}),
        "$.prompts[0].weight",
        "unknown field",
        id="prompt-field",
    ),
    pytest.param(_prompts("<lora:x:abc>"), "$.prompts[0]", "lora weight 'abc'", id="tag"),
    pytest.param(
        _prompts({"prompt": "x", "negative": "<embedding:>"}),
        "$.prompts[0].negative",
        "embedding name is empty",
        id="tag-neg",
    ),
    pytest.param({**_prompts("a"), "colour": 1}, "$.colour", "unknown field", id="top-field"),
    pytest.param(
        {**_prompts("a"), "preset": {"stepz": 3}},
        "$.preset.stepz",
        "unknown preset field 'stepz'",
        id="preset-field",
    ),
    pytest.param(
        {**_prompts("a"), "preset": {"hires": {"bogus": 1}}},
        "$.preset.hires.bogus",
        "unknown preset field 'hires.bogus'",
        id="preset-nested",
    ),
    pytest.param(
        {**_prompts("a"), "preset": {"cfg_scale": 99}},
        "$.preset.cfg_scale",
        "invalid preset value for 'cfg_scale' (99)",
        id="preset-value",
    ),
    pytest.param(
        {**_prompts("a"), "preset": {"upscale": {"mode": "magic"}}},
        "$.preset.upscale.mode",
        "invalid preset value for 'upscale.mode'",
        id="preset-nested-value",
    ),
    pytest.param(
        {**_prompts("a"), "preset": {"width": 4096, "height": 4096, "batch_size": 2}},
        "$.preset",
        "pixels is over the limit",
        id="preset-model-validator",
    ),
    pytest.param(
        {**_prompts("a"), "preset": {"prompt": "x"}},
        "$.preset.prompt",
        "may not set 'prompt'",
        id="preset-prompt",
    ),
    pytest.param(
        {**_prompts("a"), "preset": {"seed": 1}},
        "$.preset.seed",
        "may not set 'seed'",
        id="preset-seed",
    ),
    pytest.param(
        _prompts("a [[style]]"), "$.prompts[0]", "unknown matrix slot [[style]]", id="slot"
    ),
    pytest.param(
        {**_prompts("a"), "matrix": {"slots": {"style": []}}},
        "$.matrix.slots.style",
        "has no values",
        id="slot-empty",
    ),
    pytest.param(
        {**_prompts("a"), "matrix": {"slots": {"style": ["x", " "]}}},
        "$.matrix.slots.style[1]",
        "empty value",
        id="slot-value",
    ),
    pytest.param(
        {**_prompts("a"), "matrix": {"slots": {"my style": ["x"]}}},
        '$.matrix.slots["my style"]',
        "bad matrix slot name",
        id="slot-name",
    ),
    pytest.param(
        {**_prompts("a"), "matrix": {"slots": {"s": ["x"]}, "mode": "random"}},
        "$.matrix.limit",
        "'random' needs a limit",
        id="random-no-limit",
    ),
    pytest.param(
        {**_prompts("a"), "matrix": {"mode": "grid"}},
        "$.matrix.mode",
        "'fanout' or 'random'",
        id="matrix-mode",
    ),
    pytest.param(
        {**_prompts("a"), "matrix": {"limit": 0}},
        "$.matrix.limit",
        "greater than or equal to 1",
        id="limit",
    ),
    pytest.param(
        {**_prompts("a"), "seed_mode": "often"}, "$.seed_mode", "Input should be", id="sm"
    ),
    pytest.param({**_prompts("a"), "seed": -2}, "$.seed", "greater than or equal to -1", id="seed"),
    pytest.param({**_prompts("a"), "seed": "5"}, "$.seed", "valid integer", id="seed-str"),
    pytest.param({**_prompts("a"), "seed": 2**32}, "$.seed", "less than or equal", id="seed-hi"),
    pytest.param(
        {**_prompts("a"), "images_per_prompt": 0}, "$.images_per_prompt", "greater than", id="ipp"
    ),
    pytest.param({**_prompts("a"), "name": " "}, "$.name", "the name is empty", id="name"),
]


@pytest.mark.parametrize(("content", "where", "cause"), JSON_ERRORS)
def test_json_errors_name_file_path_and_cause(
    write_pack: WritePack, content: dict[str, Any], where: str, cause: str
) -> None:
    path = write_pack("broken.json", content)
    with pytest.raises(PackError) as caught:
        load_pack(path)
    message = str(caught.value)
    assert message.startswith(f"{path}, ")
    assert f"{where}: " in message
    assert cause in message


@pytest.mark.parametrize(
    ("text", "where", "cause"),
    [
        ('{\n  "prompts": ["a",]\n}', "line 2 column 19", "malformed JSON"),
        ('{"prompts": ["a"]', "line 1 column 18", "malformed JSON"),
        ('{"prompts": ["a"], "seed": NaN}', "", "NaN is not a valid JSON number"),
        ('{"prompts": ["a"], "prompts": ["b"]}', "", "duplicate key 'prompts'"),
        ('["a", "b"]', "$", "expected a JSON object, got list"),
        ("   \n", "", "the file is empty"),
    ],
)
def test_malformed_json(write_pack: WritePack, text: str, where: str, cause: str) -> None:
    path = write_pack("bad.json", text)
    with pytest.raises(PackError) as caught:
        load_pack(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert where in message
    assert cause in message


def test_deeply_nested_json_is_a_pack_error(write_pack: WritePack) -> None:
    path = write_pack("deep.json", '{"prompts": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(PackError, match=r"deep\.json"):
        load_pack(path)


def test_unknown_wildcard_in_json(write_pack: WritePack) -> None:
    path = write_pack("w.json", _prompts("a", {"prompt": "b __nope__"}))
    with pytest.raises(PackError) as caught:
        load_pack(path)
    message = str(caught.value)
    assert message.startswith(f"{path}, $.prompts[1].prompt: unknown wildcard __nope__")
    assert str(Path("wildcards") / "nope.txt") in message


def test_wildcard_in_json(write_pack: WritePack, write_wildcard: WriteWildcard) -> None:
    write_wildcard("color", "red\nblue\n")
    pack = load_pack(write_pack("w.json", _prompts("a __color__ car")))
    assert pack.wildcards == {"color": ["red", "blue"]}


def test_committed_schema_equals_the_model_schema() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render_pack_schema(), (
        "stablenew_core/schemas/pack.schema.json is stale: run `python -m stablenew_core.packs`"
    )
    assert json.loads(SCHEMA_PATH.read_text(encoding="utf-8")) == pack_json_schema()


def test_schema_accepts_the_fixture_and_rejects_unknown_fields(fixtures: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = pack_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    fixture = json.loads((fixtures / "landscapes.json").read_text(encoding="utf-8"))
    assert list(validator.iter_errors(fixture)) == []
    assert list(validator.iter_errors({**fixture, "colour": 1}))
    assert list(validator.iter_errors({**fixture, "preset": {"stepz": 1}}))
    assert list(validator.iter_errors({**fixture, "preset": {"prompt": "x"}}))
    assert not list(validator.iter_errors({**fixture, "preset": {"hires": {"enabled": True}}}))
