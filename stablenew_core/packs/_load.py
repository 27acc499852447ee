"""Reading a pack file (.txt or .json) into a validated PromptPack; every problem is a PackError."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast, get_args

from pydantic import ValidationError

from ..config import PipelineConfig
from ..errors import PackError
from ._models import (
    HARD_MAX_JOBS,
    MAX_SEED,
    RESERVED_PRESET_KEYS,
    UNION_TAGS,
    JsonPack,
    JsonPrompt,
    MatrixMode,
    PackMatrix,
    PackPrompt,
    PromptPack,
    SeedMode,
)
from ._syntax import SLOT_NAME, check_slots, check_tags, fail, format_weight, tokens

MAX_FILE_BYTES = 5 * 1024 * 1024
WILDCARD_DIR = "wildcards"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def load_pack(path: str | Path) -> PromptPack:
    """Parse and validate a .txt or .json prompt pack; PackError on anything wrong."""
    pack_path = Path(path)
    if pack_path.suffix.lower() not in {".txt", ".json"}:
        fail(
            pack_path,
            "",
            f"unsupported pack format {pack_path.suffix or '(no suffix)'!r}: use .txt or .json",
        )
    text = _read_text(pack_path, what="pack file")
    if not text.strip():
        fail(pack_path, "", "the file is empty")
    wildcards = _Wildcards(pack_path)
    suffix = pack_path.suffix.lower()
    try:
        if suffix == ".txt":
            pack = _TxtParser(pack_path, wildcards).parse(text)
        else:
            pack = _parse_json(pack_path, text, wildcards)
    except RecursionError:
        fail(pack_path, "", "the content is nested too deeply")
    return pack


def _read_text(path: Path, *, what: str, where_from: tuple[Path, str] | None = None) -> str:
    """The text of a file; a PackError (naming ``where_from`` if given) when it can't be read."""

    def problem(message: str) -> PackError:
        if where_from is not None:
            origin, where = where_from
            prefix = f"{origin}, {where}" if where else str(origin)
            return PackError(f"{prefix}: {message}")
        return PackError(f"{path}: {message}")

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise problem(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise problem(f"{what} is a directory: {path}") from None
    except OSError as exc:
        raise problem(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise problem(f"{what} {path} is {len(data)} bytes, over the limit of {MAX_FILE_BYTES}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PackError(f"{path}, line {line}: not valid UTF-8 (byte {exc.start})") from None


class _Wildcards:
    """Loads ``wildcards/<name>.txt`` beside the pack, once per name."""

    def __init__(self, pack_path: Path) -> None:
        self.pack_path = pack_path
        self.directory = pack_path.parent / WILDCARD_DIR
        self.values: dict[str, list[str]] = {}

    def require(self, name: str, where: str) -> None:
        if name in self.values:
            return
        file = self.directory / f"{name}.txt"
        if not file.is_file():
            fail(self.pack_path, where, f"unknown wildcard __{name}__: no file {file}")
        text = _read_text(file, what="wildcard file", where_from=(self.pack_path, where))
        values: list[str] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            problem = check_tags(line)
            if problem:
                fail(file, f"line {number}", problem)
            values.append(line)
        if not values:
            fail(self.pack_path, where, f"wildcard __{name}__: {file} has no values")
        self.values[name] = values


def _check_template(
    pack_path: Path, where: str, template: str, slots: Sequence[str], wildcards: _Wildcards
) -> None:
    """Tags well formed, slots declared, wildcards found: else a PackError at ``where``."""
    problem = check_tags(template) or check_slots(template, slots)
    if problem:
        fail(pack_path, where, problem)
    for kind, name in tokens(template):
        if kind == "wildcard":
            wildcards.require(name, where)


def _check_matrix(
    pack_path: Path, matrix: PackMatrix, locate: Callable[[str, int | None], str]
) -> None:
    """Slot names and values well formed; random mode has a limit."""
    for slot, values in matrix.slots.items():
        if not SLOT_NAME.fullmatch(slot):
            fail(
                pack_path,
                locate(slot, None),
                f"bad matrix slot name {slot!r}: use letters, digits, '_' and '-', "
                "starting with a letter",
            )
        if not values:
            fail(pack_path, locate(slot, None), f"matrix slot {slot!r} has no values")
        seen: set[str] = set()
        for index, value in enumerate(values):
            if not value.strip():
                fail(pack_path, locate(slot, index), f"matrix slot {slot!r} has an empty value")
            if value in seen:
                fail(pack_path, locate(slot, index), f"matrix slot {slot!r}: duplicate {value!r}")
            seen.add(value)
            problem = check_tags(value)
            if problem:
                fail(pack_path, locate(slot, index), problem)
    if matrix.mode == "random" and matrix.limit is None:
        fail(pack_path, locate("", None), "matrix mode 'random' needs a limit")


# --- presets ---------------------------------------------------------------------------------


def _check_preset(
    pack_path: Path, preset: dict[str, Any], locate: Callable[[tuple[str | int, ...]], str]
) -> None:
    """The preset must be a valid partial PipelineConfig without prompt or seed."""
    for key, reason in RESERVED_PRESET_KEYS.items():
        if key in preset:
            fail(pack_path, locate((key,)), f"preset may not set {key!r}: {reason}")
    try:
        PipelineConfig.model_validate({**preset, "prompt": "preset check"})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(part for part in error["loc"] if part not in UNION_TAGS)
            dotted = ".".join(map(str, loc))
            if error["type"] == "extra_forbidden":
                message = f"unknown preset field {dotted!r}"
            elif loc:
                message = (
                    f"invalid preset value for {dotted!r} ({_short(error.get('input'))}): "
                    f"{error_message(error)}"
                )
            else:
                message = f"invalid preset: {error_message(error)}"
            problems.append((locate(loc), message))
        _fail_many(pack_path, problems)


def error_message(error: Any) -> str:
    """A pydantic error's message without pydantic's 'Value error, ' prefix."""
    return str(error["msg"]).removeprefix("Value error, ")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail_many(pack_path: Path, problems: list[tuple[str, str]]) -> NoReturn:
    shown = [f"{where}: {message}" if where else message for where, message in problems[:10]]
    more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise PackError(f"{pack_path}, {'; '.join(shown)}{more}")


# --- .json -----------------------------------------------------------------------------------


class _JsonContentError(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _JsonContentError(f"duplicate key {key!r} in a JSON object")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise _JsonContentError(f"{name} is not a valid JSON number")


def json_path(loc: Sequence[str | int], root: str = "$") -> str:
    """A pydantic location as a JSON path: ``$.prompts[3].loras[0].weight``."""
    text = root
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in UNION_TAGS:
            continue
        elif _IDENTIFIER.fullmatch(part):
            text += f".{part}"
        else:
            text += f"[{json.dumps(part)}]"
    return text


def _parse_json(pack_path: Path, text: str, wildcards: _Wildcards) -> PromptPack:
    try:
        data = json.loads(
            text, object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        fail(pack_path, f"line {exc.lineno} column {exc.colno}", f"malformed JSON: {exc.msg}")
    except _JsonContentError as exc:
        fail(pack_path, "", f"malformed JSON: {exc}")
    if not isinstance(data, dict):
        fail(pack_path, "$", f"expected a JSON object, got {type(data).__name__}")
    try:
        spec = JsonPack.model_validate(data, strict=True)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = json_path(error["loc"])
            if error["type"] == "extra_forbidden":
                problems.append((where, "unknown field"))
            elif error["type"] == "missing":
                problems.append((where, "missing (required)"))
            else:
                problems.append(
                    (where, f"{error_message(error)} (got {_short(error.get('input'))})")
                )
        _fail_many(pack_path, problems)

    name = spec.name if spec.name is not None else pack_path.stem
    if not name.strip():
        fail(pack_path, "$.name", "the name is empty")
    if not spec.prompts:
        fail(pack_path, "$.prompts", "no prompts: the list is empty")

    def locate_slot(slot: str, index: int | None) -> str:
        if not slot:
            return "$.matrix.limit"
        where = json_path(["matrix", "slots", slot])
        return where if index is None else f"{where}[{index}]"

    _check_matrix(pack_path, spec.matrix, locate_slot)
    _check_preset(pack_path, spec.preset, lambda loc: json_path(["preset", *loc]))

    slots = list(spec.matrix.slots)
    prompts: list[PackPrompt] = []
    for index, item in enumerate(spec.prompts):
        base = f"$.prompts[{index}]"
        if isinstance(item, JsonPrompt):
            prompt = _json_prompt(pack_path, base, item)
            text_where, negative_where = f"{base}.prompt", f"{base}.negative"
        else:
            prompt = PackPrompt(text=item, json_path=base)
            text_where = negative_where = base
        if not _item_text(item).strip():
            fail(pack_path, text_where, "empty prompt")
        _check_template(pack_path, text_where, prompt.text, slots, wildcards)
        _check_template(pack_path, negative_where, prompt.negative, slots, wildcards)
        prompts.append(prompt)

    return _build(
        pack_path,
        name=name,
        prompts=prompts,
        matrix=spec.matrix,
        preset=spec.preset,
        images_per_prompt=spec.images_per_prompt,
        seed_mode=spec.seed_mode,
        seed=spec.seed,
        wildcards=wildcards.values,
    )


def _item_text(item: str | JsonPrompt) -> str:
    return item.prompt if isinstance(item, JsonPrompt) else item


def _json_prompt(pack_path: Path, base: str, item: JsonPrompt) -> PackPrompt:
    parts = [item.prompt.strip()]
    for index, lora in enumerate(item.loras):
        name = lora.name.strip()
        if not name or any(char in name for char in ":<>"):
            fail(
                pack_path,
                f"{base}.loras[{index}].name",
                f"bad lora name {lora.name!r}: must be non-blank, without ':', '<' or '>'",
            )
        parts.append(f"<lora:{name}:{format_weight(lora.weight)}>")
    for index, embedding in enumerate(item.embeddings):
        name = embedding.strip()
        if not name or any(char in name for char in "<>,") or len(name.split()) > 1:
            fail(
                pack_path,
                f"{base}.embeddings[{index}]",
                f"bad embedding name {embedding!r}: must be one word, without '<', '>' or ','",
            )
        parts.append(name)
    return PackPrompt(text=", ".join(parts), negative=item.negative.strip(), json_path=base)


def _build(pack_path: Path, **fields: Any) -> PromptPack:
    try:
        return PromptPack(pack_id=pack_path.stem, path=pack_path, **fields)
    except ValidationError as exc:  # the parsers check everything first: this is a backstop
        raise PackError(f"{pack_path}: invalid pack: {exc}") from None


# --- .txt ------------------------------------------------------------------------------------

_DIRECTIVE = re.compile(r"@(?P<name>[A-Za-z_][A-Za-z0-9_-]*)\s*:?\s*(?P<arg>.*)")
_DIRECTIVES = (
    "name",
    "matrix",
    "matrix_mode",
    "matrix_limit",
    "images_per_prompt",
    "seed_mode",
    "seed",
    "preset",
)
_NEG = "neg:"


@dataclass
class _Block:
    first_line: int
    texts: list[tuple[int, str]] = field(default_factory=list)
    negatives: list[tuple[int, str]] = field(default_factory=list)


class _TxtParser:
    """Two passes: collect blocks and directives, then check every prompt against the matrix."""

    def __init__(self, pack_path: Path, wildcards: _Wildcards) -> None:
        self.path = pack_path
        self.wildcards = wildcards
        self.blocks: list[_Block] = []
        self.seen: dict[str, int] = {}
        self.name = pack_path.stem
        self.slots: dict[str, list[str]] = {}
        self.slot_lines: dict[str, int] = {}
        self.mode: MatrixMode = "fanout"
        self.limit: int | None = None
        self.images_per_prompt = 1
        self.seed_mode: SeedMode = "increment"
        self.seed = -1
        self.preset: dict[str, Any] = {}
        self.preset_lines: dict[tuple[str, ...], int] = {}

    def parse(self, text: str) -> PromptPack:
        block: _Block | None = None
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line:
                block = None
                continue
            if line.startswith("#"):
                continue
            if line.startswith("@"):
                self._directive(number, line)
                continue
            if line.startswith(("\\#", "\\@")):
                line = line[1:]
            if block is None:
                block = _Block(first_line=number)
                self.blocks.append(block)
            if line[: len(_NEG)].lower() == _NEG:
                block.negatives.append((number, line[len(_NEG) :].strip()))
            else:
                block.texts.append((number, line))
        return self._finish()

    def _finish(self) -> PromptPack:
        if not self.blocks:
            fail(self.path, "", "no prompts (only comments, directives or blank lines)")
        matrix = PackMatrix(slots=self.slots, mode=self.mode, limit=self.limit)

        def locate_slot(slot: str, _index: int | None) -> str:
            if not slot:
                return f"line {self.seen.get('matrix_mode', 1)}"
            return f"line {self.slot_lines[slot]}"

        _check_matrix(self.path, matrix, locate_slot)
        _check_preset(self.path, self.preset, self._locate_preset)
        slots = list(self.slots)
        prompts = []
        for block in self.blocks:
            if not block.texts:
                fail(
                    self.path,
                    f"line {block.negatives[0][0]}",
                    "empty prompt: a 'neg:' line needs a prompt line in the same block",
                )
            for number, part in [*block.texts, *block.negatives]:
                _check_template(self.path, f"line {number}", part, slots, self.wildcards)
            prompts.append(
                PackPrompt(
                    text=" ".join(part for _, part in block.texts),
                    negative=", ".join(part for _, part in block.negatives if part),
                    source_line=block.texts[0][0],
                )
            )
        return _build(
            self.path,
            name=self.name,
            prompts=prompts,
            matrix=matrix,
            preset=self.preset,
            images_per_prompt=self.images_per_prompt,
            seed_mode=self.seed_mode,
            seed=self.seed,
            wildcards=self.wildcards.values,
        )

    def _locate_preset(self, loc: tuple[str | int, ...]) -> str:
        keys = tuple(str(part) for part in loc)
        for size in range(len(keys), 0, -1):
            if keys[:size] in self.preset_lines:
                return f"line {self.preset_lines[keys[:size]]}"
        first = min(self.preset_lines.values(), default=None)
        return f"line {first}" if first is not None else ""

    def _directive(self, number: int, line: str) -> None:
        where = f"line {number}"
        match = _DIRECTIVE.fullmatch(line)
        name = match.group("name").lower().replace("-", "_") if match else ""
        if not match or name not in _DIRECTIVES:
            fail(
                self.path,
                where,
                f"unknown directive {line.split()[0]!r} (known: "
                f"{', '.join('@' + known for known in _DIRECTIVES)}; "
                "a prompt line starting with '@' is written '\\@')",
            )
        arg = match.group("arg").strip()
        if name == "matrix":
            self._matrix(number, arg)
            return
        if name == "preset":
            self._preset(number, arg)
            return
        if name in self.seen:
            fail(self.path, where, f"duplicate @{name} (first at line {self.seen[name]})")
        self.seen[name] = number
        if name == "name":
            if not arg:
                fail(self.path, where, "@name needs a name")
            self.name = arg
        elif name == "matrix_mode":
            self.mode = cast(MatrixMode, self._choice(where, name, arg, get_args(MatrixMode)))
        elif name == "seed_mode":
            self.seed_mode = cast(SeedMode, self._choice(where, name, arg, get_args(SeedMode)))
        elif name == "matrix_limit":
            self.limit = None if arg.lower() == "none" else self._int(where, name, arg, 1, None)
        elif name == "images_per_prompt":
            self.images_per_prompt = self._int(where, name, arg, 1, HARD_MAX_JOBS)
        elif name == "seed":
            self.seed = self._int(where, name, arg, -1, MAX_SEED)

    def _choice(self, where: str, name: str, arg: str, choices: tuple[str, ...]) -> str:
        value = arg.lower()
        if value not in choices:
            fail(self.path, where, f"@{name} must be one of {', '.join(choices)}, got {arg!r}")
        return value

    def _int(self, where: str, name: str, arg: str, low: int, high: int | None) -> int:
        if not re.fullmatch(r"[+-]?\d{1,20}", arg):
            fail(self.path, where, f"@{name} must be a whole number, got {arg!r}")
        value = int(arg)
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            fail(self.path, where, f"@{name} must be {bound}, got {value}")
        return value

    def _matrix(self, number: int, arg: str) -> None:
        where = f"line {number}"
        slot, colon, rest = arg.partition(":")
        slot = slot.strip()
        if not colon or not slot:
            fail(self.path, where, "expected '@matrix slot: value | value | ...'")
        if slot in self.slots:
            fail(
                self.path,
                where,
                f"matrix slot {slot!r} declared twice (first at line {self.slot_lines[slot]})",
            )
        self.slots[slot] = [value.strip() for value in rest.split("|")]
        self.slot_lines[slot] = number

    def _preset(self, number: int, arg: str) -> None:
        where = f"line {number}"
        key, colon, raw_value = arg.partition(":")
        keys = tuple(part.strip() for part in key.split("."))
        if not colon or not all(_IDENTIFIER.fullmatch(part) for part in keys):
            fail(self.path, where, "expected '@preset field: value' (e.g. '@preset steps: 30')")
        raw_value = raw_value.strip()
        value: Any
        try:
            value = json.loads(raw_value, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            value = raw_value
        target = self.preset
        for depth, part in enumerate(keys[:-1]):
            existing = target.setdefault(part, {})
            if not isinstance(existing, dict):
                first = self._locate_preset(keys[: depth + 1])
                fail(self.path, where, f"preset {key.strip()!r} conflicts with {first}")
            target = existing
        if keys[-1] in target or keys in self.preset_lines:
            first = self._locate_preset(keys)
            fail(self.path, where, f"preset {key.strip()!r} set twice (first at {first})")
        target[keys[-1]] = value
        self.preset_lines[keys] = number
