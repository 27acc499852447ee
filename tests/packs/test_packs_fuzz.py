"""Fuzzing load_pack: whatever the file holds, only PackError ever escapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stablenew_core.errors import PackError
from stablenew_core.packs import PromptPack, expand_pack, load_pack

FRAGMENTS = [
    "a cat",
    "neg:",
    "NEG: ugly",
    "#",
    "\\#",
    "\\@",
    "@",
    "@seed ",
    "@seed -1",
    "@seed 99999999999",
    "@seed_mode random",
    "@matrix s: a | b",
    "@matrix t: x|",
    "@matrix_mode random",
    "@matrix_limit 2",
    "@images_per_prompt 3",
    "@name N",
    "@preset steps: 30",
    "@preset hires.enabled: true",
    "@preset width: 500",
    "@preset prompt: x",
    "@preset: {",
    "[[s]]",
    "[[t]]",
    "[[u]]",
    "[[",
    "]]",
    "__animal__",
    "__nope__",
    "__",
    "_a_",
    "<lora:x:0.5>",
    "<lora:",
    "<lora:x:y>",
    "<embedding:e>",
    "<embedding:>",
    ">",
    "<",
    ":",
    "|",
    " ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    "\ufeff",
    "\x00",
    "é",
    "(x:1.2)",
]

line = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=6).map("".join)
txt_content = st.lists(line, max_size=12).map("\n".join)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _check(path: Path) -> None:
    try:
        pack = load_pack(path)
    except PackError:
        return
    assert isinstance(pack, PromptPack)
    assert pack.prompts
    try:
        entries = expand_pack(pack, max_jobs=64)
    except PackError:
        return
    assert 1 <= len(entries) <= 64
    assert [entry.index for entry in entries] == list(range(len(entries)))


def _wildcards(tmp_path: Path) -> None:
    directory = tmp_path / "wildcards"
    directory.mkdir(exist_ok=True)
    (directory / "animal.txt").write_text("cat\nfox\n", encoding="utf-8")


@FUZZ
@given(content=txt_content)
def test_fuzz_txt_content(tmp_path: Path, content: str) -> None:
    _wildcards(tmp_path)
    path = tmp_path / "fuzz.txt"
    path.write_text(content, encoding="utf-8", errors="surrogatepass")
    _check(path)


@FUZZ
@given(content=st.binary(max_size=200))
def test_fuzz_txt_bytes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fuzz.txt"
    path.write_bytes(content)
    _check(path)


json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.sampled_from(FRAGMENTS),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "prompt",
                    "negative",
                    "loras",
                    "name",
                    "weight",
                    "embeddings",
                    "slots",
                    "mode",
                    "limit",
                    "steps",
                    "hires",
                    "enabled",
                ]
            )
            | st.text(max_size=5),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)
prompt_text = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=4).map("".join)
prompt_object = st.fixed_dictionaries(
    {"prompt": prompt_text},
    optional={
        "negative": prompt_text,
        "loras": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["x", "", "a:b", " "])},
                optional={"weight": st.one_of(st.floats(-2, 2), json_value)},
            ),
            max_size=2,
        ),
        "embeddings": st.lists(st.sampled_from(["e", "", "two words", "<x>"]), max_size=2),
    },
)
matrix = st.fixed_dictionaries(
    {},
    optional={
        "slots": st.dictionaries(
            st.sampled_from(["s", "t", "1x", "my slot"]),
            st.lists(st.sampled_from(["a", "b", "c", "", "a"]), max_size=3),
            max_size=2,
        ),
        "mode": st.sampled_from(["fanout", "random", "grid"]),
        "limit": st.one_of(st.none(), st.integers(-1, 5)),
    },
)
preset = st.dictionaries(
    st.sampled_from(["steps", "cfg_scale", "width", "hires", "prompt", "stepz", "negative_prompt"]),
    st.one_of(st.integers(0, 600), st.sampled_from([{"enabled": True}, {"x": 1}, "lowres"])),
    max_size=3,
)


def _either(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(good, good, good, json_value)


json_pack = st.fixed_dictionaries(
    {"prompts": _either(st.lists(st.one_of(prompt_text, prompt_object), max_size=4))},
    optional={
        "name": _either(st.text(max_size=5)),
        "matrix": _either(matrix),
        "preset": _either(preset),
        "images_per_prompt": _either(st.integers(0, 40)),
        "seed_mode": _either(st.sampled_from(["fixed", "increment", "random", "x"])),
        "seed": _either(st.integers(-3, 2**33)),
    },
)


@FUZZ
@given(content=json_pack)
def test_fuzz_json_content(tmp_path: Path, content: dict[str, Any]) -> None:
    _wildcards(tmp_path)
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    _check(path)
