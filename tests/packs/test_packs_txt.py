"""The .txt pack format: parsing, directives, tags, wildcards, and every error message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stablenew_core.errors import PackError, StablenewError
from stablenew_core.packs import PackMatrix, PromptPack, load_pack

WritePack = Callable[[str, Any], Path]
WriteWildcard = Callable[[str, str], Path]


def test_fixture_pack_loads(fixtures: Path) -> None:
    pack = load_pack(fixtures / "portraits.txt")
    assert isinstance(pack, PromptPack)
    assert pack.pack_id == "portraits"
    assert pack.path == fixtures / "portraits.txt"
    assert pack.name == "Portraits"
    assert [p.text for p in pack.prompts] == [
        "portrait of a __animal__ knight, [[style]], <lora:detail_tweaker:0.6> at [[light]]",
        "close-up of a __animal__, <embedding:fancy_eyes>",
    ]
    assert [p.negative for p in pack.prompts] == ["blurry, lowres", "watermark"]
    assert [p.source_line for p in pack.prompts] == [9, 15]
    assert pack.matrix == PackMatrix(
        slots={"style": ["oil painting", "watercolor"], "light": ["dawn", "dusk"]}
    )
    assert pack.preset == {"steps": 28, "hires": {"enabled": True}}
    assert (pack.seed, pack.seed_mode, pack.images_per_prompt) == (1000, "increment", 1)
    assert pack.wildcards == {"animal": ["cat", "fox", "owl"]}


def test_lines_join_with_a_space_and_comments_do_not_split(write_pack: WritePack) -> None:
    path = write_pack(
        "multi.txt",
        "  first line,  \n# a comment inside the block\nsecond line\n@seed 3\nthird\n\n\nnext\n",
    )
    pack = load_pack(path)
    assert [p.text for p in pack.prompts] == ["first line, second line third", "next"]
    assert pack.name == "multi"
    assert pack.seed == 3


def test_neg_lines_anywhere_in_block_and_any_case(write_pack: WritePack) -> None:
    pack = load_pack(write_pack("n.txt", "NEG: ugly\na cat\nneg:   \nneg: blurry\n"))
    assert pack.prompts[0].text == "a cat"
    assert pack.prompts[0].negative == "ugly, blurry"


def test_escaped_hash_and_at(write_pack: WritePack) -> None:
    pack = load_pack(write_pack("e.txt", "\\#1 best\n\\@artist style\n"))
    assert pack.prompts[0].text == "#1 best @artist style"


def test_all_directives(write_pack: WritePack) -> None:
    text = (
        "@name: My pack\n@matrix a: x | y\n@matrix-mode random\n@matrix_limit: 1\n"
        "@images_per_prompt 3\n@seed_mode FIXED\n@seed 4294967295\n"
        '@preset sampler_name: DPM++ 2M\n@preset hires: {"enabled": true}\n'
        "@preset hires.scale: 1.5\n@preset model: null\n\n[[a]]\n"
    )
    pack = load_pack(write_pack("d.txt", text))
    assert pack.name == "My pack"
    assert pack.matrix == PackMatrix(slots={"a": ["x", "y"]}, mode="random", limit=1)
    assert (pack.images_per_prompt, pack.seed_mode, pack.seed) == (3, "fixed", 2**32 - 1)
    assert pack.preset == {
        "sampler_name": "DPM++ 2M",
        "hires": {"enabled": True, "scale": 1.5},
        "model": None,
    }


def test_tags_kept_verbatim(write_pack: WritePack) -> None:
    line = "a <lora:a b:0.5>, <lora:x>, <lora:y:-1:.5>, <lora:z:1e-1> <embedding:neg v2> (x:1.2)"
    pack = load_pack(write_pack("t.txt", line + "\n"))
    assert pack.prompts[0].text == line


def test_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "win.txt"
    path.write_bytes("\ufeff@seed 5\r\nfirst\r\n\r\nsecond\r\n".encode())
    pack = load_pack(path)
    assert [p.text for p in pack.prompts] == ["first", "second"]
    assert pack.seed == 5


def test_wildcard_values_skip_blank_and_comment_lines(
    write_pack: WritePack, write_wildcard: WriteWildcard
) -> None:
    write_wildcard("hair-color", "# colours\n red \n\nblue\n")
    pack = load_pack(write_pack("w.txt", "__hair-color__ hair\n"))
    assert pack.wildcards == {"hair-color": ["red", "blue"]}


def test_double_brackets_with_spaces_are_a1111_syntax(write_pack: WritePack) -> None:
    pack = load_pack(write_pack("b.txt", "a [[blue sky]] and [ [green] ] and [[x:y:0.5]]\n"))
    assert pack.prompts[0].text == "a [[blue sky]] and [ [green] ] and [[x:y:0.5]]"


# Every error names the file, the line and the cause.
TXT_ERRORS = [
    pytest.param("", "", "the file is empty", id="empty-file"),
    pytest.param("  \n\n\t\n", "", "the file is empty", id="blank-file"),
    pytest.param("# only\n@seed 1\n", "", "no prompts", id="no-prompts"),
    pytest.param("a\n\nneg: ugly\n", "line 3", "empty prompt", id="neg-without-prompt"),
    pytest.param("a\n<lora:x:abc>\n", "line 2", "lora weight 'abc' is not a number", id="weight"),
    pytest.param("<lora:x:1_0>\n", "line 1", "lora weight '1_0' is not a number", id="weight-2"),
    pytest.param("<lora:x:nan>\n", "line 1", "lora weight 'nan' is not a number", id="nan"),
    pytest.param("<lora:x:>\n", "line 1", "lora weight '' is not a number", id="no-weight"),
    pytest.param("<lora: :1>\n", "line 1", "the lora name is empty", id="lora-name"),
    pytest.param("<lora:a:1:2:3>\n", "line 1", "expected <lora:name:weight>", id="lora-parts"),
    pytest.param("<embedding:>\n", "line 1", "the embedding name is empty", id="emb-name"),
    pytest.param("<embedding:a:1>\n", "line 1", "expected <embedding:name>", id="emb-parts"),
    pytest.param("x <lora:a:1\n", "line 1", "unclosed <lora: tag", id="unclosed"),
    pytest.param("x\nneg: <lora:a:q>\n", "line 2", "lora weight 'q'", id="weight-in-neg"),
    pytest.param("a [[style]]\n", "line 1", "unknown matrix slot [[style]]", id="slot"),
    pytest.param(
        "@matrix style: a\n\nx\nneg: [[light]]\n",
        "line 4",
        "unknown matrix slot [[light]]",
        id="slot-in-neg",
    ),
    pytest.param("@foo bar\nx\n", "line 1", "unknown directive '@foo'", id="directive"),
    pytest.param("@\nx\n", "line 1", "unknown directive '@'", id="bare-at"),
    pytest.param("@seed 1\n@seed 2\nx\n", "line 2", "duplicate @seed (first at line 1)", id="dup"),
    pytest.param("@seed abc\nx\n", "line 1", "@seed must be a whole number", id="seed-text"),
    pytest.param("@seed -2\nx\n", "line 1", "@seed must be between -1 and", id="seed-low"),
    pytest.param("@seed 4294967296\nx\n", "line 1", "between -1 and 4294967295", id="seed-hi"),
    pytest.param("@seed_mode often\nx\n", "line 1", "@seed_mode must be one of", id="mode"),
    pytest.param("@matrix_mode grid\nx\n", "line 1", "@matrix_mode must be one of", id="mmode"),
    pytest.param("@matrix_limit 0\nx\n", "line 1", "@matrix_limit must be at least 1", id="lim"),
    pytest.param("@images_per_prompt 9000\nx\n", "line 1", "must be between 1 and 8192", id="ipp"),
    pytest.param("@name\nx\n", "line 1", "@name needs a name", id="name"),
    pytest.param("@matrix style\nx\n", "line 1", "expected '@matrix slot: value", id="matrix"),
    pytest.param("@matrix s: a || b\nx\n", "line 1", "'s' has an empty value", id="empty-value"),
    pytest.param("@matrix s: a | a\nx\n", "line 1", "'s': duplicate 'a'", id="dup-value"),
    pytest.param(
        "x\n@matrix s: a\n@matrix s: b\n",
        "line 3",
        "declared twice (first at line 2)",
        id="dup-slot",
    ),
    pytest.param("@matrix 1st: a\nx\n", "line 1", "bad matrix slot name '1st'", id="slot-name"),
    pytest.param("@matrix s: <lora:x:y>\nx\n", "line 1", "lora weight 'y'", id="slot-tag"),
    pytest.param(
        "@matrix s: a\n@matrix_mode random\nx\n",
        "line 2",
        "'random' needs a limit",
        id="random-no-limit",
    ),
    pytest.param("@preset stepz: 3\nx\n", "line 1", "unknown preset field 'stepz'", id="preset"),
    pytest.param(
        "x\n@preset hires.bogus: 1\n",
        "line 2",
        "unknown preset field 'hires.bogus'",
        id="preset-nested",
    ),
    pytest.param(
        "@preset steps: 500\nx\n",
        "line 1",
        "invalid preset value for 'steps' (500)",
        id="preset-value",
    ),
    pytest.param(
        "@preset width: 500\nx\n", "line 1", "must be a multiple of 8", id="preset-validator"
    ),
    pytest.param(
        "@preset width: 4096\n@preset height: 4096\n@preset batch_size: 2\nx\n",
        "line 1",
        "pixels is over the limit",
        id="preset-model-validator",
    ),
    pytest.param("@preset prompt: hi\nx\n", "line 1", "may not set 'prompt'", id="preset-prompt"),
    pytest.param("@preset seed: 3\nx\n", "line 1", "may not set 'seed'", id="preset-seed"),
    pytest.param("@preset steps 30\nx\n", "line 1", "expected '@preset field: value'", id="syn"),
    pytest.param(
        "@preset steps: 1\n@preset steps: 2\nx\n",
        "line 2",
        "set twice (first at line 1)",
        id="preset-twice",
    ),
    pytest.param(
        "@preset steps: 1\n@preset steps.x: 2\nx\n",
        "line 2",
        "conflicts with line 1",
        id="preset-conflict",
    ),
]


@pytest.mark.parametrize(("content", "where", "cause"), TXT_ERRORS)
def test_txt_errors_name_file_line_and_cause(
    write_pack: WritePack, content: str, where: str, cause: str
) -> None:
    path = write_pack("broken.txt", content)
    with pytest.raises(PackError) as caught:
        load_pack(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert where in message
    assert cause in message


def test_unknown_wildcard_names_file_line_and_wildcard(write_pack: WritePack) -> None:
    path = write_pack("wild.txt", "# c\na cat\nwith __nope__ eyes\n")
    with pytest.raises(PackError) as caught:
        load_pack(path)
    message = str(caught.value)
    assert str(path) in message
    assert "line 3" in message
    assert "unknown wildcard __nope__" in message
    assert str(Path("wildcards") / "nope.txt") in message


def test_empty_wildcard_file(write_pack: WritePack, write_wildcard: WriteWildcard) -> None:
    write_wildcard("empty", "# nothing\n\n")
    path = write_pack("p.txt", "x __empty__\n")
    with pytest.raises(PackError, match=r"p\.txt, line 1: wildcard __empty__: .*has no values"):
        load_pack(path)


def test_bad_tag_in_wildcard_file_names_the_wildcard_file(
    write_pack: WritePack, write_wildcard: WriteWildcard
) -> None:
    wildcard = write_wildcard("bad", "ok\n<lora:x:heavy>\n")
    with pytest.raises(PackError) as caught:
        load_pack(write_pack("p.txt", "x __bad__\n"))
    assert str(caught.value).startswith(f"{wildcard}, line 2: ")
    assert "lora weight 'heavy' is not a number" in str(caught.value)


def test_wildcard_file_not_utf8(tmp_path: Path, write_pack: WritePack) -> None:
    (tmp_path / "wildcards").mkdir()
    bad = tmp_path / "wildcards" / "w.txt"
    bad.write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(PackError, match=r"w\.txt, line 2: not valid UTF-8"):
        load_pack(write_pack("p.txt", "x __w__\n"))


def test_pack_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.txt"
    path.write_bytes(b"ok\nok\n\x80\n")
    with pytest.raises(PackError, match=r"bin\.txt, line 3: not valid UTF-8"):
        load_pack(path)


def test_missing_file_directory_and_suffix(tmp_path: Path) -> None:
    with pytest.raises(PackError, match=r"missing\.txt: pack file not found"):
        load_pack(tmp_path / "missing.txt")
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(PackError, match=r"dir\.txt: pack file is a directory"):
        load_pack(tmp_path / "dir.txt")
    (tmp_path / "p.yaml").write_text("x")
    with pytest.raises(PackError, match=r"p\.yaml: unsupported pack format '\.yaml'"):
        load_pack(tmp_path / "p.yaml")


def test_pack_error_is_in_the_family(write_pack: WritePack) -> None:
    with pytest.raises(PackError) as caught:
        load_pack(write_pack("x.txt", ""))
    assert isinstance(caught.value, StablenewError)
    assert isinstance(caught.value, ValueError)
