"""The WebUI layer: the A1111 HTTP client, the A1111-compatible simulator and its process.

Importing this package loads only the client; the simulator (Starlette, uvicorn) and
:class:`SimulatorProcess` are imported on first use of their names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import (
    ADETAILER_UNIT_FIELDS,
    EXTRAS_SINGLE_IMAGE_FIELDS,
    FIELDS_BY_PATH,
    IMG2IMG_FIELDS,
    TXT2IMG_FIELDS,
    GenerationResult,
    WebUIClient,
    check_payload,
    unknown_fields,
)

if TYPE_CHECKING:
    from .process import SimulatorProcess
    from .simulator import FaultSpec, SimulatorOptions, create_app, serve

__all__ = [
    "ADETAILER_UNIT_FIELDS",
    "EXTRAS_SINGLE_IMAGE_FIELDS",
    "FIELDS_BY_PATH",
    "IMG2IMG_FIELDS",
    "TXT2IMG_FIELDS",
    "FaultSpec",
    "GenerationResult",
    "SimulatorOptions",
    "SimulatorProcess",
    "WebUIClient",
    "check_payload",
    "create_app",
    "serve",
    "unknown_fields",
]

_LAZY = {
    "FaultSpec": "simulator",
    "SimulatorOptions": "simulator",
    "create_app": "simulator",
    "serve": "simulator",
    "SimulatorProcess": "process",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), name)
