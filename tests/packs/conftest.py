"""Helpers for the prompt-pack tests: write pack and wildcard files under tmp_path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

WritePack = Callable[[str, str | dict[str, Any]], Path]
WriteWildcard = Callable[[str, str], Path]


@pytest.fixture
def fixtures() -> Path:
    """The committed fixture packs (read only)."""
    return FIXTURES


@pytest.fixture
def write_pack(tmp_path: Path) -> WritePack:
    """Write a pack file: text as given, a dict as JSON."""

    def write(name: str, content: str | dict[str, Any]) -> Path:
        path = tmp_path / name
        text = json.dumps(content, indent=2) if isinstance(content, dict) else content
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def write_wildcard(tmp_path: Path) -> WriteWildcard:
    """Write ``wildcards/<name>.txt`` beside the packs written by ``write_pack``."""

    def write(name: str, content: str) -> Path:
        directory = tmp_path / "wildcards"
        directory.mkdir(exist_ok=True)
        path = directory / f"{name}.txt"
        path.write_text(content, encoding="utf-8")
        return path

    return write
