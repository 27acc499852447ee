"""An A1111-compatible WebUI simulator: a Starlette app served by uvicorn.

Owns the stand-in for the real WebUI that tests, benchmarks and ``stablenew webui-sim`` run
against: the same routes, request fields and answers as AUTOMATIC1111's API for txt2img,
img2img, extras, the model/sampler lists, progress, interrupt and skip; one generation at a
time behind a FIFO lock, taking ``steps x step_seconds``; deterministic PNGs from (seed, prompt);
optional basic auth on every route (as ``--api-auth``); fault injection; and ``/sim/*`` routes
for observability (every generation with its timing, outcome and unknown fields).

Run it: ``python -m stablenew_core.webui.simulator --host 127.0.0.1 --port 7861
[--step-seconds 0.05] [--auth user:pass] [--fault 500:2 ...]`` (``--auth`` may instead come from
the environment variable ``STABLENEW_SIM_AUTH``, which keeps it out of the process list).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import uvicorn
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import _images
from .client import (
    EXTRAS_SINGLE_IMAGE_FIELDS,
    EXTRAS_SINGLE_IMAGE_PATH,
    IMG2IMG_FIELDS,
    IMG2IMG_PATH,
    TXT2IMG_FIELDS,
    TXT2IMG_PATH,
    unknown_fields,
)

logger = logging.getLogger("stablenew_core.webui.simulator")

FaultKind = Literal["500", "oom", "drop", "hang", "garbage", "422"]
RouteName = Literal["txt2img", "img2img", "extra-single-image"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
ROUTE_NAMES: tuple[str, ...] = get_args(RouteName)

SIM_VERSION = "v1.10.1-sim"
EXTRAS_STEPS = 5
"""Extras has no sampling steps; the simulator charges this many steps of time for it."""

SAMPLERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("DPM++ 2M", ("k_dpmpp_2m",)),
    ("DPM++ SDE", ("k_dpmpp_sde",)),
    ("DPM++ 2M SDE", ("k_dpmpp_2m_sde_ka",)),
    ("Euler a", ("k_euler_a", "k_euler_ancestral")),
    ("Euler", ("k_euler",)),
    ("LMS", ("k_lms",)),
    ("Heun", ("k_heun",)),
    ("DDIM", ("ddim",)),
    ("UniPC", ("unipc",)),
)
SCHEDULERS: tuple[tuple[str, str], ...] = (
    ("automatic", "Automatic"),
    ("uniform", "Uniform"),
    ("karras", "Karras"),
    ("exponential", "Exponential"),
    ("polyexponential", "Polyexponential"),
    ("sgm_uniform", "SGM Uniform"),
)
UPSCALERS: tuple[tuple[str, float | None], ...] = (
    ("None", None),
    ("Lanczos", 4.0),
    ("Nearest", 4.0),
    ("ESRGAN_4x", 4.0),
    ("R-ESRGAN 4x+", 4.0),
    ("R-ESRGAN 4x+ Anime6B", 4.0),
    ("SwinIR 4x", 4.0),
)
LATENT_UPSCALE_MODES: tuple[str, ...] = (
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
)
DEFAULT_MODELS: tuple[str, ...] = ("sim-base-v1-5", "sim-xl-base-1.0", "sim-anime-v3")
DEFAULT_VAES: tuple[str, ...] = ("sim-vae-ft-mse-840000.safetensors",)


# ---------------------------------------------------------------------------------------------
# Options and fault specs
# ---------------------------------------------------------------------------------------------


class FaultSpec(BaseModel):
    """The next ``count`` generation requests on ``routes`` (all when None) fail as ``kind``."""

    model_config = ConfigDict(extra="forbid")

    kind: FaultKind
    count: int = Field(default=1, ge=1)
    routes: list[RouteName] | None = None

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """``KIND[:COUNT[:route,route]]``, e.g. ``500:2`` or ``drop:1:txt2img``."""
        parts = text.strip().split(":")
        if not parts[0] or len(parts) > 3:
            raise ValueError(f"fault must look like KIND:COUNT[:route,...], got {text!r}")
        count = int(parts[1]) if len(parts) > 1 and parts[1] else 1
        routes = [r.strip() for r in parts[2].split(",") if r.strip()] if len(parts) > 2 else None
        return cls.model_validate({"kind": parts[0].lower(), "count": count, "routes": routes})

    def matches(self, route: str) -> bool:
        return self.routes is None or route in self.routes


class SimulatorOptions(BaseModel):
    """How a simulator instance behaves."""

    model_config = ConfigDict(extra="forbid")

    step_seconds: float = Field(default=0.01, ge=0.0, description="Time per sampling step.")
    auth: SecretStr | None = Field(default=None, description="'user:pass' as --api-auth.")
    faults: list[FaultSpec] = Field(default_factory=list)
    models: list[str] = Field(default_factory=lambda: list(DEFAULT_MODELS), min_length=1)
    vaes: list[str] = Field(default_factory=lambda: list(DEFAULT_VAES))
    alwayson_scripts: list[str] = Field(
        default_factory=lambda: ["ADetailer"], description="Installed always-on scripts."
    )
    max_pixels: int = Field(
        default=4096 * 4096,
        ge=64 * 64,
        description="width x height x batch_size above which a request 'runs out of memory'.",
    )
    random_seed: int | None = Field(default=None, description="Seeds the -1 seed resolution.")

    @field_validator("auth")
    @classmethod
    def _user_colon_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            user, sep, password = value.get_secret_value().partition(":")
            if not sep or not user or not password:
                raise ValueError("must look like user:password")
        return value

    def credentials(self) -> tuple[str, str] | None:
        """The (user, password) pair, or None without auth."""
        if self.auth is None:
            return None
        user, _, password = self.auth.get_secret_value().partition(":")
        return user, password


# ---------------------------------------------------------------------------------------------
# Request bodies (A1111 types every field Optional; unknown fields are accepted and ignored)
# ---------------------------------------------------------------------------------------------


class _ProcessingBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0.0
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int | None = Field(default=1, ge=1)
    n_iter: int | None = Field(default=1, ge=1)
    steps: int | None = Field(default=50, ge=1)
    cfg_scale: float | None = 7.0
    width: int | None = Field(default=512, ge=8)
    height: int | None = Field(default=512, ge=8)
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    force_task_id: str | None = None
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] | None = None


class _Txt2ImgBody(_ProcessingBody):
    enable_hr: bool | None = False
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    denoising_strength: float | None = 0.75


class _Img2ImgBody(_ProcessingBody):
    init_images: list[str] | None = None
    resize_mode: int | None = 0
    denoising_strength: float | None = 0.75
    mask: str | None = None
    include_init_images: bool | None = False
    width: int | None = Field(default=None, ge=8)  # None: the init image's size
    height: int | None = Field(default=None, ge=8)


class _ExtrasBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    resize_mode: Literal[0, 1] = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(default=0, ge=0, le=1)
    codeformer_visibility: float = Field(default=0, ge=0, le=1)
    codeformer_weight: float = Field(default=0, ge=0, le=1)
    upscaling_resize: float = Field(default=2, gt=0)
    upscaling_resize_w: int = Field(default=512, ge=1)
    upscaling_resize_h: int = Field(default=512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(default=0, ge=0, le=1)
    upscale_first: bool = False
    image: str = ""


_ROUTES: dict[str, tuple[str, type[BaseModel], frozenset[str]]] = {
    "txt2img": (TXT2IMG_PATH, _Txt2ImgBody, TXT2IMG_FIELDS),
    "img2img": (IMG2IMG_PATH, _Img2ImgBody, IMG2IMG_FIELDS),
    "extra-single-image": (EXTRAS_SINGLE_IMAGE_PATH, _ExtrasBody, EXTRAS_SINGLE_IMAGE_FIELDS),
}


class _HTTPError(Exception):
    """An A1111-style error answer: ``{"error", "detail", "body", "errors"}``."""

    def __init__(
        self, status: int, detail: str = "", *, error: str = "HTTPException", errors: str = ""
    ) -> None:
        super().__init__(detail or errors)
        self.status = status
        self.detail = detail
        self.error = error
        self.errors = errors

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.error, "detail": self.detail, "body": "", "errors": self.errors},
            status_code=self.status,
        )


def _validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """FastAPI's 422 answer for a malformed body."""
    return JSONResponse({"detail": errors}, status_code=422)


def _pydantic_errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": ["body", *error["loc"]], "msg": error["msg"], "type": error["type"]}
        for error in exc.errors(include_url=False)
    ]


# ---------------------------------------------------------------------------------------------
# The simulator's state
# ---------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """The generation that holds the lock now (A1111's ``shared.state``)."""

    task_id: str | None
    job: str
    job_count: int
    started: float
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    skipped: bool = False

    def fraction(self) -> float:
        if self.job_count <= 0:
            return 0.0
        value = self.job_no / self.job_count
        if self.sampling_steps > 0:
            value += self.sampling_step / self.sampling_steps / self.job_count
        return min(value, 1.0)

    def eta(self, now: float) -> float | None:
        progress = self.fraction()
        if progress <= 0:
            return None
        elapsed = now - self.started
        return elapsed / progress - elapsed


@dataclass
class _Model:
    name: str
    sha256: str

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.name}.safetensors [{self.short_hash}]"

    def aliases(self) -> set[str]:
        return {
            self.title,
            self.name,
            f"{self.name}.safetensors",
            self.short_hash,
            self.sha256,
        }


class _Simulator:
    def __init__(self, options: SimulatorOptions) -> None:
        self.options = options
        self.step_seconds = options.step_seconds
        self.random = random.Random(options.random_seed)
        self.lock = asyncio.Lock()  # FIFO: waiters are woken in arrival order
        self.current: _Job | None = None
        self.pending: dict[str, float] = {}
        self.finished: deque[str] = deque(maxlen=16)  # as A1111's progress module
        self.faults: list[FaultSpec] = [fault.model_copy() for fault in options.faults]
        self.models = [
            _Model(name, hashlib.sha256(name.encode()).hexdigest()) for name in options.models
        ]
        self.opts: dict[str, Any] = {
            "sd_model_checkpoint": self.models[0].title,
            "sd_checkpoint_hash": self.models[0].sha256,
            "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1,
            "samples_format": "png",
            "enable_pnginfo": True,
            "return_grid": True,
            "img2img_fix_steps": False,
        }
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.active = 0 if self.current is None else 1
        self.max_concurrent = self.active
        self.options_posts: list[dict[str, Any]] = []
        self.interrupts = 0
        self.skips = 0

    # -- faults ---------------------------------------------------------------------------

    def take_fault(self, route: str) -> str | None:
        for fault in self.faults:
            if fault.count > 0 and fault.matches(route):
                fault.count -= 1
                kind = fault.kind
                self.faults = [f for f in self.faults if f.count > 0]
                return kind
        return None

    # -- lookups --------------------------------------------------------------------------

    def find_model(self, name: str | None) -> _Model | None:
        if not name:
            return None
        for model in self.models:
            if name in model.aliases():
                return model
        return None

    def current_model(self) -> _Model:
        return self.find_model(self.opts.get("sd_model_checkpoint")) or self.models[0]

    @staticmethod
    def sampler_known(name: str) -> bool:
        names = {n for n, _ in SAMPLERS} | {a for _, aliases in SAMPLERS for a in aliases}
        if name in names:
            return True
        labels = [label for _, label in SCHEDULERS]
        return any(name == f"{base} {label}" for base in names for label in labels)

    @staticmethod
    def upscaler_known(name: str) -> bool:
        return name in {n for n, _ in UPSCALERS} or name in LATENT_UPSCALE_MODES

    def script_known(self, name: str) -> bool:
        return name.lower() in {s.lower() for s in self.options.alwayson_scripts}

    # -- records --------------------------------------------------------------------------

    def new_record(
        self, route: str, raw: dict[str, Any], arrived: float, unknown: list[str]
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": len(self.records),
            "route": route,
            "force_task_id": raw.get("force_task_id") if route != "extra-single-image" else None,
            "task_id": None,
            "prompt": raw.get("prompt") if isinstance(raw.get("prompt"), str) else None,
            "requested_seed": raw.get("seed"),
            "seed": None,
            "seeds": [],
            "steps": raw.get("steps"),
            "n_images": 0,
            "model": None,
            "override_settings": raw.get("override_settings"),
            "arrived_at": arrived,
            "started_at": None,
            "finished_at": None,
            "outcome": "pending",
            "status_code": None,
            "unknown_fields": unknown,
        }
        self.records.append(record)
        return record

    def stats(self) -> dict[str, Any]:
        outcomes = Counter(str(record["outcome"]) for record in self.records)
        return {
            "generations": self.records,
            "max_concurrent": self.max_concurrent,
            "active": self.active,
            "queued": list(self.pending),
            "counts": {
                "requests": len(self.records),
                "outcomes": dict(outcomes),
                "unknown_field_requests": sum(1 for r in self.records if r["unknown_fields"]),
                "interrupts": self.interrupts,
                "skips": self.skips,
                "options_posts": len(self.options_posts),
            },
            "options_posts": self.options_posts,
            "step_seconds": self.step_seconds,
            "faults": [fault.model_dump() for fault in self.faults],
        }


# ---------------------------------------------------------------------------------------------
# ASGI middleware: basic auth on every route, and access to the connection (for "drop")
# ---------------------------------------------------------------------------------------------

_TRANSPORT_KEY = "stablenew.sim.transport"


class _ConnectionAccess:
    """Remembers the server's transport of each request, so a fault can drop the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            cycle = getattr(receive, "__self__", None)  # uvicorn's RequestResponseCycle
            scope[_TRANSPORT_KEY] = getattr(cycle, "transport", None)
        await self.app(scope, receive, send)


class _BasicAuth:
    """HTTP basic auth on every route, answered like A1111's --api-auth."""

    def __init__(self, app: ASGIApp, credentials: tuple[str, str] | None) -> None:
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.credentials is None:
            await self.app(scope, receive, send)
            return
        reason = self._refusal(dict(scope["headers"]).get(b"authorization"))
        if reason is None:
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            {"detail": reason}, status_code=401, headers={"WWW-Authenticate": "Basic"}
        )
        await response(scope, receive, send)

    def _refusal(self, header: bytes | None) -> str | None:
        assert self.credentials is not None
        if not header:
            return "Not authenticated"
        scheme, _, value = header.decode("latin-1").partition(" ")
        if scheme.lower() != "basic":
            return "Not authenticated"
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return "Invalid authentication credentials"
        user, sep, password = decoded.partition(":")
        want_user, want_password = self.credentials
        if (
            sep
            and secrets.compare_digest(user.encode(), want_user.encode())
            and secrets.compare_digest(password.encode(), want_password.encode())
        ):
            return None
        return "Incorrect username or password"


class _DropConnection(Response):
    """Close the connection without an answer (the WebUI process died mid-request)."""

    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = scope.get(_TRANSPORT_KEY)
        if transport is not None:
            transport.close()
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        # No transport at hand: start an answer and break it off; the server then closes.
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
        raise ConnectionAbortedError("simulated dropped connection")


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_app(options: SimulatorOptions) -> Starlette:
    """The simulator as a Starlette app (state lives in the app; one app = one WebUI)."""
    sim = _Simulator(options)
    handlers = _Handlers(sim)
    routes = [
        Route("/sdapi/v1/txt2img", handlers.txt2img, methods=["POST"]),
        Route("/sdapi/v1/img2img", handlers.img2img, methods=["POST"]),
        Route("/sdapi/v1/extra-single-image", handlers.extras, methods=["POST"]),
        Route("/sdapi/v1/sd-models", handlers.sd_models, methods=["GET"]),
        Route("/sdapi/v1/samplers", handlers.samplers, methods=["GET"]),
        Route("/sdapi/v1/schedulers", handlers.schedulers, methods=["GET"]),
        Route("/sdapi/v1/upscalers", handlers.upscalers, methods=["GET"]),
        Route("/sdapi/v1/latent-upscale-modes", handlers.latent_modes, methods=["GET"]),
        Route("/sdapi/v1/sd-vae", handlers.sd_vae, methods=["GET"]),
        Route("/sdapi/v1/options", handlers.options, methods=["GET", "POST"]),
        Route("/sdapi/v1/progress", handlers.progress, methods=["GET"]),
        Route("/internal/progress", handlers.internal_progress, methods=["POST"]),
        Route("/sdapi/v1/interrupt", handlers.interrupt, methods=["POST"]),
        Route("/sdapi/v1/skip", handlers.skip, methods=["POST"]),
        Route("/sim/stats", handlers.stats, methods=["GET"]),
        Route("/sim/reset", handlers.reset, methods=["POST"]),
        Route("/sim/config", handlers.config, methods=["GET", "POST"]),
        Route("/sim/faults", handlers.faults, methods=["GET", "POST", "DELETE"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(_ConnectionAccess),
            Middleware(_BasicAuth, credentials=options.credentials()),
        ],
    )
    app.state.simulator = sim
    return app


async def _read_json(request: Request) -> tuple[Any, JSONResponse | None]:
    body = await request.body()
    try:
        return json.loads(body or b"null"), None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, _validation_response(
            [{"loc": ["body", 0], "msg": f"JSON decode error: {exc}", "type": "json_invalid"}]
        )


def _not_an_object() -> JSONResponse:
    return _validation_response(
        [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type"}]
    )


def _quote(value: object) -> str:
    """A1111's infotext quoting: JSON-quote values holding ',', ':' or a newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _infotext(prompt: str, negative: str, params: dict[str, object]) -> str:
    line = ", ".join(
        f"{key}: {_quote(value)}" for key, value in params.items() if value is not None
    )
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{line}".strip()


def _decode_image(encoded: str) -> Image.Image:
    if encoded.startswith("data:image/"):
        encoded = encoded.split(";")[1].split(",")[1]
    try:
        return _images.decode(base64.b64decode(encoded))
    except Exception as exc:
        raise _HTTPError(500, "Invalid encoded image") from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class _Plan:
    """What one generation request will do, worked out before it takes the lock."""

    route: str
    body: BaseModel
    raw: dict[str, Any]
    prompt: str
    negative: str
    width: int
    height: int
    batch_size: int
    n_iter: int
    passes: list[int]
    job: str
    init: list[Image.Image]
    denoising: float | None
    model: _Model
    model_fallback: bool
    vae: str
    clip_skip: int
    sampler: str | None


class _Handlers:
    def __init__(self, sim: _Simulator) -> None:
        self.sim = sim

    # -- generation -----------------------------------------------------------------------

    async def txt2img(self, request: Request) -> Response:
        return await self._generate(request, "txt2img")

    async def img2img(self, request: Request) -> Response:
        return await self._generate(request, "img2img")

    async def extras(self, request: Request) -> Response:
        return await self._generate(request, "extra-single-image")

    async def _generate(self, request: Request, route: str) -> Response:
        sim = self.sim
        arrived = time.time()
        path, model_cls, _ = _ROUTES[route]
        raw, error = await _read_json(request)
        if error is not None:
            return error
        if not isinstance(raw, dict):
            return _not_an_object()
        unknown = unknown_fields(path, raw)
        record = sim.new_record(route, raw, arrived, unknown)
        if unknown:
            logger.warning(
                "%s: unknown field(s) ignored, as A1111 does: %s", path, ", ".join(unknown)
            )
        try:
            body = model_cls.model_validate(raw)
        except ValidationError as exc:
            record.update(outcome="rejected", status_code=422, finished_at=time.time())
            return _validation_response(_pydantic_errors(exc))

        fault = sim.take_fault(route)
        if fault == "422":
            record.update(outcome="422", status_code=422, finished_at=time.time())
            return _validation_response(
                [{"loc": ["body"], "msg": "simulated validation error", "type": "value_error"}]
            )
        if fault == "hang":
            record.update(outcome="hang", started_at=time.time())
            logger.warning("%s: hanging (fault injection) until the client gives up", path)
            while (await request.receive())["type"] != "http.disconnect":
                pass
            record["finished_at"] = time.time()
            return Response(status_code=204)

        try:
            self._check(body)  # what A1111 refuses before it queues the request
        except _HTTPError as exc:
            record.update(outcome="rejected", status_code=exc.status, finished_at=time.time())
            return exc.response()

        task_id: str | None = None
        if route != "extra-single-image":
            task_id = getattr(body, "force_task_id", None) or f"task({secrets.token_hex(8)})"
            sim.pending[task_id] = time.time()
        record["task_id"] = task_id

        # No await between reading the body and queueing: the lock's FIFO is arrival order.
        async with sim.lock:
            if task_id is not None:
                sim.pending.pop(task_id, None)
            job = _Job(task_id=task_id, job=route, job_count=1, started=time.time())
            sim.current = job
            sim.active += 1
            sim.max_concurrent = max(sim.max_concurrent, sim.active)
            record["started_at"] = job.started
            try:
                try:
                    plan = await self._plan(route, body, raw)
                except _HTTPError as exc:
                    record.update(outcome="rejected", status_code=exc.status)
                    return exc.response()
                record["model"] = plan.model.title
                if plan.model_fallback:
                    record["model_fallback"] = True
                job.job = plan.job
                job.job_count = len(plan.passes) * plan.n_iter
                return await self._run(plan, job, fault, record)
            finally:
                sim.active -= 1
                sim.current = None
                if task_id is not None:
                    sim.finished.append(task_id)
                record["finished_at"] = time.time()

    def _check(self, body: BaseModel) -> None:
        sim = self.sim
        if isinstance(body, _ExtrasBody):
            if not body.image:
                raise _HTTPError(500, "Invalid encoded image")
            return
        assert isinstance(body, _ProcessingBody)
        if body.script_name:
            raise _HTTPError(422, f"Script '{body.script_name}' not found")
        for name in body.alwayson_scripts or {}:
            if not sim.script_known(name):
                raise _HTTPError(422, f"always on script {name} not found")
        sampler = body.sampler_name or body.sampler_index
        if sampler is not None and not sim.sampler_known(sampler):
            raise _HTTPError(404, "Sampler not found")
        if isinstance(body, _Img2ImgBody) and body.init_images is None:
            raise _HTTPError(404, "Init image not found")

    async def _plan(self, route: str, body: BaseModel, raw: dict[str, Any]) -> _Plan:
        sim = self.sim
        if isinstance(body, _ExtrasBody):
            source = await asyncio.to_thread(_decode_image, body.image)
            model = sim.current_model()
            return _Plan(
                route=route,
                body=body,
                raw=raw,
                prompt="",
                negative="",
                width=source.width,
                height=source.height,
                batch_size=1,
                n_iter=1,
                passes=[EXTRAS_STEPS],
                job="extras",
                init=[source],
                denoising=None,
                model=model,
                model_fallback=False,
                vae=str(sim.opts["sd_vae"]),
                clip_skip=1,
                sampler=None,
            )
        assert isinstance(body, _ProcessingBody)
        sampler = body.sampler_name or body.sampler_index
        overrides = body.override_settings or {}
        wanted = overrides.get("sd_model_checkpoint")
        found = sim.find_model(wanted) if wanted else sim.current_model()
        fallback = found is None
        model = found or sim.current_model()
        if fallback:  # A1111 prints a warning and loads a fallback checkpoint
            logger.warning("Checkpoint %s not found; loading fallback %s", wanted, model.title)
        vae = str(overrides.get("sd_vae", sim.opts["sd_vae"]))
        clip_skip = int(
            overrides.get("CLIP_stop_at_last_layers", sim.opts["CLIP_stop_at_last_layers"])
        )
        steps = body.steps or 50
        batch_size = body.batch_size or 1
        n_iter = body.n_iter or 1
        init: list[Image.Image] = []
        denoising = body.denoising_strength
        if isinstance(body, _Img2ImgBody):
            assert body.init_images is not None  # checked before queueing
            init = [await asyncio.to_thread(_decode_image, item) for item in body.init_images]
            if not init:
                raise _HTTPError(500, error="IndexError", errors="list index out of range")
            width = body.width or init[0].width
            height = body.height or init[0].height
            first = max(1, int(min(denoising or 0.0, 0.999) * steps))
            passes = [first]
            if any(name.lower() == "adetailer" for name in body.alwayson_scripts or {}):
                passes.append(steps)
            job = "img2img"
        else:
            assert isinstance(body, _Txt2ImgBody)
            width = body.width or 512
            height = body.height or 512
            passes = [steps]
            if body.enable_hr:
                passes.append(body.hr_second_pass_steps or steps)
            else:
                denoising = None
            job = "txt2img"
        return _Plan(
            route=route,
            body=body,
            raw=raw,
            prompt=body.prompt or "",
            negative=body.negative_prompt or "",
            width=width,
            height=height,
            batch_size=batch_size,
            n_iter=n_iter,
            passes=passes,
            job=job,
            init=init,
            denoising=denoising,
            model=model,
            model_fallback=fallback,
            vae=vae,
            clip_skip=clip_skip,
            sampler=sampler,
        )

    async def _run(
        self, plan: _Plan, job: _Job, fault: str | None, record: dict[str, Any]
    ) -> Response:
        sim = self.sim
        if fault in ("500", "oom", "drop", "garbage"):
            record.update(outcome=fault)
            await asyncio.sleep(sim.step_seconds)
            return self._fault_response(fault, record)
        error = self._inner_error(plan)
        if error is not None:
            record.update(outcome=error.error.lower(), status_code=error.status)
            return error.response()

        produced = 0
        for _iteration in range(plan.n_iter):
            for pass_steps in plan.passes:
                job.sampling_steps = pass_steps
                job.sampling_step = 0
                job.skipped = False
                for step in range(pass_steps):
                    if job.interrupted or job.skipped:
                        break
                    await asyncio.sleep(sim.step_seconds)
                    job.sampling_step = step + 1
                job.job_no += 1
                if job.interrupted:
                    break
            produced += 1
            if job.interrupted:
                break
        record["outcome"] = "interrupted" if job.interrupted else "ok"
        record["status_code"] = 200
        if isinstance(plan.body, _ExtrasBody):
            payload = await asyncio.to_thread(self._extras_answer, plan)
            record["n_images"] = 1
        else:
            payload = await asyncio.to_thread(
                self._answer, plan, produced * plan.batch_size, record
            )
        return JSONResponse(payload)

    def _inner_error(self, plan: _Plan) -> _HTTPError | None:
        """Failures A1111 raises inside the generation (after taking the lock)."""
        body = plan.body
        if isinstance(body, _ExtrasBody):
            if not self.sim.upscaler_known(body.upscaler_1):
                return _HTTPError(
                    500,
                    error="AssertionError",
                    errors=f"could not find upscaler named {body.upscaler_1}",
                )
            return None
        if isinstance(body, _Txt2ImgBody) and body.enable_hr:
            upscaler = body.hr_upscaler
            if upscaler is not None and not self.sim.upscaler_known(upscaler):
                return _HTTPError(
                    500, error="Exception", errors=f"could not find upscaler named {upscaler}"
                )
        scale = (body.hr_scale or 1.0) if isinstance(body, _Txt2ImgBody) and body.enable_hr else 1
        pixels = plan.width * plan.height * plan.batch_size * scale * scale
        if pixels > self.sim.options.max_pixels:
            return _HTTPError(
                500,
                error="OutOfMemoryError",
                errors=(
                    f"CUDA out of memory. Tried to allocate {pixels * 12 / 2**30:.2f} GiB "
                    "(simulated: width x height x batch_size is over the simulator's max_pixels)"
                ),
            )
        return None

    def _fault_response(self, fault: str, record: dict[str, Any]) -> Response:
        logger.warning("%s: failing as %r (fault injection)", record["route"], fault)
        if fault == "500":
            record["status_code"] = 500
            return _HTTPError(
                500, error="RuntimeError", errors="simulated failure inside the generation"
            ).response()
        if fault == "oom":
            record["status_code"] = 500
            return _HTTPError(
                500,
                error="OutOfMemoryError",
                errors=(
                    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 8.00 GiB total "
                    "capacity; 6.31 GiB already allocated) (simulated)"
                ),
            ).response()
        if fault == "garbage":
            record["status_code"] = 200
            return Response(
                b"<html><body>502 upstream garbage \x00\xff</body></html>",
                status_code=200,
                media_type="text/html",
            )
        return _DropConnection()

    def _answer(self, plan: _Plan, count: int, record: dict[str, Any]) -> dict[str, Any]:
        body = plan.body
        assert isinstance(body, _ProcessingBody)
        total = plan.batch_size * plan.n_iter
        seed = body.seed if body.seed is not None and body.seed != -1 else None
        if seed is None:
            seed = self.sim.random.randrange(4294967294)
        subseed = body.subseed if body.subseed is not None and body.subseed != -1 else None
        if subseed is None:
            subseed = self.sim.random.randrange(4294967294)
        strength = body.subseed_strength or 0.0
        all_seeds = [seed + (i if strength == 0 else 0) for i in range(total)]
        all_subseeds = [subseed + i for i in range(total)]
        all_prompts = [plan.prompt] * total
        all_negative = [plan.negative] * total

        params: dict[str, object] = {
            "Steps": body.steps or 50,
            "Sampler": plan.sampler,
            "Schedule type": None if body.scheduler in (None, "automatic") else body.scheduler,
            "CFG scale": body.cfg_scale,
            "Seed": None,
            "Size": f"{plan.width}x{plan.height}",
            "Model hash": plan.model.short_hash,
            "Model": plan.model.name,
            "VAE": None if plan.vae in ("Automatic", "None") else plan.vae,
            "Denoising strength": plan.denoising,
            "Clip skip": plan.clip_skip if plan.clip_skip > 1 else None,
        }
        extra: dict[str, object] = {}
        if isinstance(body, _Txt2ImgBody) and body.enable_hr:
            extra["Hires upscale"] = body.hr_scale
            if body.hr_second_pass_steps:
                extra["Hires steps"] = body.hr_second_pass_steps
            if body.hr_upscaler:
                extra["Hires upscaler"] = body.hr_upscaler
        extra.update(_adetailer_params(body.alwayson_scripts or {}))
        params.update(extra)
        params["Version"] = SIM_VERSION

        images: list[str] = []
        infotexts: list[str] = []
        for index in range(count):
            params["Seed"] = all_seeds[index]
            text = _infotext(all_prompts[index], all_negative[index], params)
            infotexts.append(text)
            if isinstance(body, _Img2ImgBody):
                init = plan.init[index % len(plan.init)]
                image = _images.blend(
                    init,
                    all_seeds[index],
                    plan.prompt,
                    plan.width,
                    plan.height,
                    plan.denoising if plan.denoising is not None else 0.75,
                )
            else:
                width, height = plan.width, plan.height
                if isinstance(body, _Txt2ImgBody) and body.enable_hr:
                    width, height = _hires_size(body, width, height)
                image = _images.render(all_seeds[index], plan.prompt, width, height)
            if body.send_images is not False:
                images.append(_b64(_images.encode_png(image, {"parameters": text})))
        info = {
            "prompt": plan.prompt,
            "all_prompts": all_prompts,
            "negative_prompt": plan.negative,
            "all_negative_prompts": all_negative,
            "seed": seed,
            "all_seeds": all_seeds,
            "subseed": subseed,
            "all_subseeds": all_subseeds,
            "subseed_strength": strength,
            "width": plan.width,
            "height": plan.height,
            "sampler_name": plan.sampler,
            "cfg_scale": body.cfg_scale,
            "steps": body.steps or 50,
            "batch_size": plan.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": plan.model.name,
            "sd_model_hash": plan.model.short_hash,
            "sd_vae_name": None if plan.vae in ("Automatic", "None") else plan.vae,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": plan.denoising,
            "extra_generation_params": extra,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": body.styles or [],
            "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
            "clip_skip": plan.clip_skip,
            "is_using_inpainting_conditioning": False,
            "version": SIM_VERSION,
        }
        record.update(seed=seed, seeds=all_seeds[:count], n_images=count)
        fields = _ROUTES[plan.route][2]
        parameters = {name: plan.raw.get(name) for name in sorted(fields)}
        parameters.update(body.model_dump(include=set(fields) & set(type(body).model_fields)))
        if isinstance(body, _Img2ImgBody) and not body.include_init_images:
            parameters["init_images"] = None
            parameters["mask"] = None
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    @staticmethod
    def _extras_answer(plan: _Plan) -> dict[str, Any]:
        body = plan.body
        assert isinstance(body, _ExtrasBody)
        init = plan.init[0]
        if body.resize_mode == 1:
            image = init.convert("RGB").resize((body.upscaling_resize_w, body.upscaling_resize_h))
            description = f"{body.upscaling_resize_w}x{body.upscaling_resize_h}"
        else:
            image = _images.upscale(init, body.upscaling_resize)
            description = f"{body.upscaling_resize:g}"
        texts = {k: v for k, v in init.info.items() if isinstance(k, str) and isinstance(v, str)}
        postprocessing = f"Postprocess upscale by: {description}, Postprocess upscaler: "
        texts["postprocessing"] = postprocessing + body.upscaler_1
        html = f"<p>{postprocessing}{body.upscaler_1}</p>"
        return {
            "html_info": html,
            "image": _b64(_images.encode_png(image, texts)) if body.show_extras_results else None,
        }

    # -- lists ------------------------------------------------------------------------------

    async def sd_models(self, request: Request) -> Response:
        return JSONResponse(
            [
                {
                    "title": model.title,
                    "model_name": model.name,
                    "hash": model.short_hash,
                    "sha256": model.sha256,
                    "filename": f"/sim/models/Stable-diffusion/{model.name}.safetensors",
                    "config": None,
                }
                for model in self.sim.models
            ]
        )

    async def samplers(self, request: Request) -> Response:
        return JSONResponse(
            [{"name": name, "aliases": list(aliases), "options": {}} for name, aliases in SAMPLERS]
        )

    async def schedulers(self, request: Request) -> Response:
        return JSONResponse(
            [
                {
                    "name": name,
                    "label": label,
                    "aliases": None,
                    "default_rho": -1.0,
                    "need_inner_model": False,
                }
                for name, label in SCHEDULERS
            ]
        )

    async def upscalers(self, request: Request) -> Response:
        return JSONResponse(
            [
                {
                    "name": name,
                    "model_name": None,
                    "model_path": None,
                    "model_url": None,
                    "scale": scale,
                }
                for name, scale in UPSCALERS
            ]
        )

    async def latent_modes(self, request: Request) -> Response:
        return JSONResponse([{"name": name} for name in LATENT_UPSCALE_MODES])

    async def sd_vae(self, request: Request) -> Response:
        return JSONResponse(
            [
                {"model_name": name, "filename": f"/sim/models/VAE/{name}"}
                for name in self.sim.options.vaes
            ]
        )

    async def options(self, request: Request) -> Response:
        sim = self.sim
        if request.method == "GET":
            return JSONResponse(sim.opts)
        raw, error = await _read_json(request)
        if error is not None:
            return error
        if not isinstance(raw, dict):
            return _not_an_object()
        during = sim.current is not None
        sim.options_posts.append(
            {"at": time.time(), "keys": sorted(raw), "during_generation": during}
        )
        if during:
            logger.warning(
                "POST /sdapi/v1/options while a generation runs (breaks it in A1111, #7723): %s",
                sorted(raw),
            )
        else:
            logger.info("POST /sdapi/v1/options: %s", sorted(raw))
        if "sd_model_checkpoint" in raw:
            model = sim.find_model(str(raw["sd_model_checkpoint"]))
            if model is None:
                raise_detail = f"model {raw['sd_model_checkpoint']!r} not found"
                return _HTTPError(500, error="RuntimeError", errors=raise_detail).response()
            raw = {**raw, "sd_model_checkpoint": model.title, "sd_checkpoint_hash": model.sha256}
        sim.opts.update(raw)
        return JSONResponse(None)

    # -- progress and control -----------------------------------------------------------------

    async def progress(self, request: Request) -> Response:
        job = self.sim.current
        now = time.time()
        if job is None:
            state = {
                "skipped": False,
                "interrupted": False,
                "stopping_generation": False,
                "job": "",
                "job_count": 0,
                "job_timestamp": "0",
                "job_no": 0,
                "sampling_step": 0,
                "sampling_steps": 0,
            }
            return JSONResponse(
                {
                    "progress": 0.0,
                    "eta_relative": 0.0,
                    "state": state,
                    "current_image": None,
                    "textinfo": None,
                }
            )
        state = {
            "skipped": job.skipped,
            "interrupted": job.interrupted,
            "stopping_generation": False,
            "job": job.job,
            "job_count": job.job_count,
            "job_timestamp": datetime.fromtimestamp(job.started).strftime("%Y%m%d%H%M%S"),
            "job_no": job.job_no,
            "sampling_step": job.sampling_step,
            "sampling_steps": job.sampling_steps,
        }
        return JSONResponse(
            {
                "progress": job.fraction(),
                "eta_relative": job.eta(now) or 0.0,
                "state": state,
                "current_image": None,
                "textinfo": None,
            }
        )

    async def internal_progress(self, request: Request) -> Response:
        raw, error = await _read_json(request)
        if error is not None:
            return error
        if not isinstance(raw, dict):
            return _not_an_object()
        task_id = raw.get("id_task")
        sim = self.sim
        job = sim.current
        active = job is not None and task_id is not None and job.task_id == task_id
        queued = task_id in sim.pending
        completed = task_id in sim.finished
        if not active or job is None:
            return JSONResponse(
                {
                    "active": False,
                    "queued": queued,
                    "completed": completed,
                    "progress": None,
                    "eta": None,
                    "live_preview": None,
                    "id_live_preview": -1,
                    "textinfo": "In queue..." if queued else "Waiting...",
                }
            )
        return JSONResponse(
            {
                "active": True,
                "queued": queued,
                "completed": completed,
                "progress": job.fraction(),
                "eta": job.eta(time.time()),
                "live_preview": None,
                "id_live_preview": raw.get("id_live_preview", -1),
                "textinfo": None,
            }
        )

    async def interrupt(self, request: Request) -> Response:
        self.sim.interrupts += 1
        if self.sim.current is not None:
            self.sim.current.interrupted = True
            logger.info("interrupt: stopping %s", self.sim.current.task_id)
        return JSONResponse({})

    async def skip(self, request: Request) -> Response:
        self.sim.skips += 1
        if self.sim.current is not None:
            self.sim.current.skipped = True
        return JSONResponse({})

    # -- /sim ---------------------------------------------------------------------------------

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.sim.stats())

    async def reset(self, request: Request) -> Response:
        self.sim._reset_stats()
        return JSONResponse({"ok": True})

    async def config(self, request: Request) -> Response:
        if request.method == "POST":
            raw, error = await _read_json(request)
            if error is not None:
                return error
            value = raw.get("step_seconds") if isinstance(raw, dict) else None
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                return _validation_response(
                    [
                        {
                            "loc": ["body", "step_seconds"],
                            "msg": "must be a number >= 0",
                            "type": "value_error",
                        }
                    ]
                )
            self.sim.step_seconds = float(value)
        return JSONResponse({"step_seconds": self.sim.step_seconds})

    async def faults(self, request: Request) -> Response:
        sim = self.sim
        if request.method == "DELETE":
            sim.faults = []
        elif request.method == "POST":
            raw, error = await _read_json(request)
            if error is not None:
                return error
            try:
                sim.faults.append(FaultSpec.model_validate(raw))
            except ValidationError as exc:
                return _validation_response(_pydantic_errors(exc))
        return JSONResponse({"faults": [fault.model_dump() for fault in sim.faults]})


def _hires_size(body: _Txt2ImgBody, width: int, height: int) -> tuple[int, int]:
    if body.hr_resize_x or body.hr_resize_y:
        target_w = body.hr_resize_x or (body.hr_resize_y or 0) * width // height
        target_h = body.hr_resize_y or (body.hr_resize_x or 0) * height // width
        return int(target_w), int(target_h)
    scale = body.hr_scale or 2.0
    return int(width * scale), int(height * scale)


def _adetailer_params(scripts: dict[str, Any]) -> dict[str, object]:
    """The infotext entries ADetailer adds (one unit: no suffix; more: ' 2nd', ...)."""
    entry = next((v for k, v in scripts.items() if k.lower() == "adetailer"), None)
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list):
        return {}
    units = [unit for unit in args if isinstance(unit, dict)]
    params: dict[str, object] = {}
    suffixes = ["", " 2nd", " 3rd", " 4th"]
    for position, unit in enumerate(units[: len(suffixes)]):
        suffix = suffixes[position]
        params[f"ADetailer model{suffix}"] = unit.get("ad_model", "None")
        if unit.get("ad_prompt"):
            params[f"ADetailer prompt{suffix}"] = unit["ad_prompt"]
        params[f"ADetailer confidence{suffix}"] = unit.get("ad_confidence", 0.3)
        params[f"ADetailer denoising strength{suffix}"] = unit.get("ad_denoising_strength", 0.4)
    if params:
        params["ADetailer version"] = "24.sim"
    return params


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------


def serve(
    options: SimulatorOptions,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    log_level: str = "warning",
) -> None:
    """Serve the simulator until interrupted (blocking). Binds 127.0.0.1 unless told otherwise."""
    config = uvicorn.Config(
        create_app(options),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    logger.info(
        "WebUI simulator on http://%s:%s (step_seconds=%s)", host, port, options.step_seconds
    )
    uvicorn.Server(config).run()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stablenew_core.webui.simulator",
        description="An AUTOMATIC1111-compatible WebUI simulator (no GPU, deterministic images).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--step-seconds", type=float, default=0.05, help="time per sampling step")
    parser.add_argument(
        "--auth",
        default=None,
        help="user:pass as the WebUI's --api-auth (or set STABLENEW_SIM_AUTH)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND:COUNT[:ROUTES]",
        help=f"fail the next COUNT generation requests; KIND is one of {', '.join(FAULT_KINDS)}",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for resolving seed -1")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    auth = args.auth or os.environ.get("STABLENEW_SIM_AUTH") or None
    faults = [FaultSpec.parse(item) for text in args.fault for item in text.split()]
    options = SimulatorOptions(
        step_seconds=args.step_seconds,
        auth=SecretStr(auth) if auth else None,
        faults=faults,
        random_seed=args.seed,
    )
    serve(options, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
