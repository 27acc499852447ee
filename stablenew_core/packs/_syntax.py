"""Token syntax shared by both pack formats: [[slot]], __wildcard__, <lora:...>, <embedding:...>."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from ..errors import PackError

SLOT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
WILDCARD_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?")

# One pass over a template finds both kinds of token; values put in are never re-scanned.
TOKEN = re.compile(
    r"\[\[(?P<slot>[A-Za-z][A-Za-z0-9_-]*)\]\]"
    r"|__(?P<wildcard>[A-Za-z0-9](?:[A-Za-z0-9_-]*?[A-Za-z0-9])??)__"
)
_TAG_START = re.compile(r"<(?P<kind>lora|embedding):")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def fail(path: Path | str, where: str, message: str) -> NoReturn:
    """Raise a PackError naming the file, the place in it (line or JSON path) and the cause."""
    prefix = f"{path}, {where}" if where else f"{path}"
    raise PackError(f"{prefix}: {message}")


def tokens(template: str) -> Iterator[tuple[str, str]]:
    """The tokens of a template in order: ``("slot", name)`` or ``("wildcard", name)``."""
    for match in TOKEN.finditer(template):
        if match.group("slot") is not None:
            yield "slot", match.group("slot")
        else:
            yield "wildcard", match.group("wildcard")


def slot_refs(*templates: str) -> set[str]:
    """The slot names used by the templates."""
    return {name for template in templates for kind, name in tokens(template) if kind == "slot"}


def check_slots(template: str, declared: Sequence[str]) -> str | None:
    """A message for the first ``[[slot]]`` not declared, or None."""
    for kind, name in tokens(template):
        if kind == "slot" and name not in declared:
            known = ", ".join(declared) if declared else "none"
            return (
                f"unknown matrix slot [[{name}]] (declared slots: {known}); for A1111's "
                f"double de-emphasis write [ [{name}] ]"
            )
    return None


def check_tags(text: str) -> str | None:
    """A message for the first malformed ``<lora:...>`` or ``<embedding:...>`` tag, or None.

    Accepted: ``<lora:name>``, ``<lora:name:weight>``, ``<lora:name:te_weight:unet_weight>``
    (weights are plain decimal numbers) and ``<embedding:name>``. Names must not be blank.
    """
    for match in _TAG_START.finditer(text):
        kind = match.group("kind")
        end = text.find(">", match.end())
        stray = text.find("<", match.end())
        if end < 0 or 0 <= stray < end:
            return f"unclosed <{kind}: tag (expected <{kind}:...>)"
        tag = text[match.start() : end + 1]
        parts = text[match.end() : end].split(":")
        if not parts[0].strip():
            return f"{tag}: the {kind} name is empty"
        if kind == "embedding":
            if len(parts) > 1:
                return f"{tag}: expected <embedding:name>"
            continue
        if len(parts) > 3:
            return f"{tag}: expected <lora:name:weight>"
        for weight in parts[1:]:
            if not _NUMBER.fullmatch(weight.strip()):
                return f"{tag}: lora weight {weight.strip()!r} is not a number"
    return None


def format_weight(weight: float) -> str:
    """A LoRA weight as A1111 writes it: ``1`` not ``1.0``, else the shortest repr."""
    return str(int(weight)) if weight.is_integer() else repr(weight)
