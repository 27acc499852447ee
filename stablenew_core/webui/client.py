"""WebUIClient: the one HTTP client of an AUTOMATIC1111-compatible WebUI.

Owns the A1111 request field names (one frozen set per endpoint, from A1111's
``modules/api/models.py`` and ``modules/processing.py``), the mapping of every transport and
HTTP failure onto the :mod:`stablenew_core.errors` hierarchy, and the decoding of answers into
:class:`GenerationResult`. One pooled :class:`httpx.Client` per instance; safe to share between
threads (a progress poller runs beside the generation request). Credentials never appear in a
message, a log line or a repr.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import unquote

import httpx
from pydantic import BaseModel, ConfigDict, Field

from ..errors import (
    ConfigError,
    WebUIAuthError,
    WebUIError,
    WebUIGenerationError,
    WebUIOutOfMemoryError,
    WebUIProtocolError,
    WebUIRejectedError,
    WebUITimeoutError,
    WebUIUnreachableError,
)
from ..settings import Settings

logger = logging.getLogger("stablenew_core.webui")

# --------------------------------------------------------------------------------------------
# A1111 field names. StableDiffusionProcessing's __init__ fields minus API_NOT_ALLOWED, plus the
# subclass fields and the "additional" API fields of models.py (A1111 v1.10).
# --------------------------------------------------------------------------------------------

_PROCESSING_FIELDS: frozenset[str] = frozenset(
    {
        "prompt",
        "negative_prompt",
        "styles",
        "seed",
        "subseed",
        "subseed_strength",
        "seed_resize_from_h",
        "seed_resize_from_w",
        "sampler_name",
        "scheduler",
        "batch_size",
        "n_iter",
        "steps",
        "cfg_scale",
        "width",
        "height",
        "restore_faces",
        "tiling",
        "do_not_save_samples",
        "do_not_save_grid",
        "eta",
        "denoising_strength",
        "s_min_uncond",
        "s_churn",
        "s_tmax",
        "s_tmin",
        "s_noise",
        "override_settings",
        "override_settings_restore_afterwards",
        "refiner_checkpoint",
        "refiner_switch_at",
        "disable_extra_networks",
        "firstpass_image",
        "comments",
        # additional API fields (both endpoints)
        "sampler_index",
        "script_name",
        "script_args",
        "send_images",
        "save_images",
        "alwayson_scripts",
        "force_task_id",
        "infotext",
    }
)

TXT2IMG_FIELDS: frozenset[str] = _PROCESSING_FIELDS | frozenset(
    {
        "enable_hr",
        "firstphase_width",
        "firstphase_height",
        "hr_scale",
        "hr_upscaler",
        "hr_second_pass_steps",
        "hr_resize_x",
        "hr_resize_y",
        "hr_checkpoint_name",
        "hr_sampler_name",
        "hr_scheduler",
        "hr_prompt",
        "hr_negative_prompt",
    }
)
"""Fields of A1111's ``StableDiffusionTxt2ImgProcessingAPI`` (POST /sdapi/v1/txt2img)."""

IMG2IMG_FIELDS: frozenset[str] = _PROCESSING_FIELDS | frozenset(
    {
        "init_images",
        "resize_mode",
        "image_cfg_scale",
        "mask",
        "mask_blur_x",
        "mask_blur_y",
        "mask_blur",
        "inpainting_fill",
        "inpaint_full_res",
        "inpaint_full_res_padding",
        "inpainting_mask_invert",
        "initial_noise_multiplier",
        "latent_mask",
        "include_init_images",
    }
)
"""Fields of A1111's ``StableDiffusionImg2ImgProcessingAPI`` (POST /sdapi/v1/img2img)."""

EXTRAS_SINGLE_IMAGE_FIELDS: frozenset[str] = frozenset(
    {
        "resize_mode",
        "show_extras_results",
        "gfpgan_visibility",
        "codeformer_visibility",
        "codeformer_weight",
        "upscaling_resize",
        "upscaling_resize_w",
        "upscaling_resize_h",
        "upscaling_crop",
        "upscaler_1",
        "upscaler_2",
        "extras_upscaler_2_visibility",
        "upscale_first",
        "image",
    }
)
"""Fields of A1111's ``ExtrasSingleImageRequest`` (POST /sdapi/v1/extra-single-image)."""

ADETAILER_UNIT_FIELDS: frozenset[str] = frozenset(
    {
        "ad_model",
        "ad_model_classes",
        "ad_tap_enable",
        "ad_prompt",
        "ad_negative_prompt",
        "ad_confidence",
        "ad_mask_k_largest",
        "ad_mask_min_ratio",
        "ad_mask_max_ratio",
        "ad_dilate_erode",
        "ad_x_offset",
        "ad_y_offset",
        "ad_mask_merge_invert",
        "ad_mask_blur",
        "ad_denoising_strength",
        "ad_inpaint_only_masked",
        "ad_inpaint_only_masked_padding",
        "ad_use_inpaint_width_height",
        "ad_inpaint_width",
        "ad_inpaint_height",
        "ad_use_steps",
        "ad_steps",
        "ad_use_cfg_scale",
        "ad_cfg_scale",
        "ad_use_checkpoint",
        "ad_checkpoint",
        "ad_use_vae",
        "ad_vae",
        "ad_use_sampler",
        "ad_sampler",
        "ad_scheduler",
        "ad_use_noise_multiplier",
        "ad_noise_multiplier",
        "ad_use_clip_skip",
        "ad_clip_skip",
        "ad_restore_face",
        "ad_controlnet_model",
        "ad_controlnet_module",
        "ad_controlnet_weight",
        "ad_controlnet_guidance_start",
        "ad_controlnet_guidance_end",
    }
)
"""Keys of one ADetailer unit (``ADetailerArgs`` in adetailer's ``adetailer/args.py``)."""

TXT2IMG_PATH = "/sdapi/v1/txt2img"
IMG2IMG_PATH = "/sdapi/v1/img2img"
EXTRAS_SINGLE_IMAGE_PATH = "/sdapi/v1/extra-single-image"

FIELDS_BY_PATH: Mapping[str, frozenset[str]] = {
    TXT2IMG_PATH: TXT2IMG_FIELDS,
    IMG2IMG_PATH: IMG2IMG_FIELDS,
    EXTRAS_SINGLE_IMAGE_PATH: EXTRAS_SINGLE_IMAGE_FIELDS,
}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_OOM_MARKERS = ("out of memory", "outofmemoryerror", "out_of_memory")
_DETAIL_LIMIT = 600


def unknown_fields(path: str, payload: Mapping[str, Any]) -> list[str]:
    """Names in ``payload`` that A1111's request model for ``path`` does not know.

    Also looks inside ``alwayson_scripts.ADetailer.args`` for unknown unit keys, reported as
    ``alwayson_scripts.ADetailer.args[i].key``.
    """
    allowed = FIELDS_BY_PATH[path]
    found = sorted(str(key) for key in payload if key not in allowed)
    scripts = payload.get("alwayson_scripts")
    if isinstance(scripts, Mapping):
        adetailer = scripts.get("ADetailer")
        args = adetailer.get("args") if isinstance(adetailer, Mapping) else None
        if isinstance(args, list):
            for position, unit in enumerate(args):
                if isinstance(unit, Mapping):
                    found.extend(
                        f"alwayson_scripts.ADetailer.args[{position}].{key}"
                        for key in sorted(str(k) for k in unit)
                        if key not in ADETAILER_UNIT_FIELDS
                    )
    return found


def check_payload(path: str, payload: Mapping[str, Any]) -> None:
    """Raise ValueError when ``payload`` carries a field A1111 would silently ignore."""
    bad = unknown_fields(path, payload)
    if bad:
        raise ValueError(
            f"request body for {path} has field(s) the WebUI does not know: {', '.join(bad)}; "
            "a real WebUI would silently ignore them. Use A1111's field names "
            "(see stablenew_core.webui.client.FIELDS_BY_PATH)"
        )


class GenerationResult(BaseModel):
    """The decoded answer of one generation request."""

    model_config = ConfigDict(frozen=True)

    images: list[bytes] = Field(description="Decoded PNG bytes, in the WebUI's order.")
    parameters: dict[str, Any] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict, description="Parsed from the info string.")
    seeds: list[int] = Field(default_factory=list)

    @property
    def infotexts(self) -> list[str]:
        """The A1111 "parameters" text of each image (aligned with :attr:`images`)."""
        texts = self.info.get("infotexts")
        if not isinstance(texts, list):
            return []
        texts = [str(text) for text in texts]
        if len(texts) > len(self.images):  # a grid's infotext comes first
            texts = texts[len(texts) - len(self.images) :]
        return texts


class WebUIClient:
    """Talks to one WebUI. Every failure is a :class:`~stablenew_core.errors.WebUIError`."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: tuple[str, str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 900.0,
    ) -> None:
        url = httpx.URL(base_url.strip().rstrip("/"))
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"WebUI URL must look like http://host:port, got {url.host!r}")
        if url.userinfo:  # credentials in the URL: move them into basic auth, out of messages
            if auth is None:
                auth = (unquote(url.username), unquote(url.password))
            url = url.copy_with(username=None, password=None)
        self.base_url = str(url).rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._secret = auth[1] if auth and auth[1] else None
        self._user = auth[0] if auth else None
        self._http = httpx.Client(
            base_url=self.base_url,
            auth=httpx.BasicAuth(auth[0], auth[1]) if auth else None,
            timeout=httpx.Timeout(
                connect=connect_timeout, read=read_timeout, write=read_timeout, pool=read_timeout
            ),
            headers={"User-Agent": "stablenew-core"},
            follow_redirects=False,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> WebUIClient:
        """A client for ``settings.webui_url`` with its credentials and timeouts."""
        auth: tuple[str, str] | None = None
        password = settings.webui_password.get_secret_value() if settings.webui_password else ""
        if settings.webui_user and password:
            auth = (settings.webui_user, password)
        elif settings.webui_user or password:
            raise ConfigError(
                "webui_user and webui_password must be set together "
                "(STABLENEW_WEBUI_USER / STABLENEW_WEBUI_PASSWORD, as the WebUI's --api-auth)"
            )
        return cls(
            settings.webui_url,
            auth=auth,
            connect_timeout=settings.webui_connect_timeout,
            read_timeout=settings.webui_read_timeout,
        )

    def __repr__(self) -> str:
        auth = ", auth=<set>" if self._user is not None else ""
        return f"WebUIClient({self.base_url!r}{auth})"

    # -- generation ------------------------------------------------------------------------

    def txt2img(self, payload: dict[str, Any], *, stage: str = "txt2img") -> GenerationResult:
        """POST /sdapi/v1/txt2img; raises ValueError on a field A1111 does not know."""
        return self._generate(TXT2IMG_PATH, payload, stage)

    def img2img(self, payload: dict[str, Any], *, stage: str = "img2img") -> GenerationResult:
        """POST /sdapi/v1/img2img; raises ValueError on a field A1111 does not know."""
        return self._generate(IMG2IMG_PATH, payload, stage)

    def extra_single_image(
        self, payload: dict[str, Any], *, stage: str = "upscale"
    ) -> GenerationResult:
        """POST /sdapi/v1/extra-single-image: one image back, ``info`` and ``parameters`` empty."""
        check_payload(EXTRAS_SINGLE_IMAGE_PATH, payload)
        data = self._json(
            self._request("POST", EXTRAS_SINGLE_IMAGE_PATH, stage, json=payload), stage
        )
        url = self._url(EXTRAS_SINGLE_IMAGE_PATH)
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("image"), str)
            or not data["image"]
        ):
            raise WebUIProtocolError(
                "the WebUI's extras answer has no 'image'",
                stage=stage,
                url=url,
                hint="check that show_extras_results is true and the upscaler exists",
            )
        image = self._decode_png(data["image"], stage, url, 0)
        return GenerationResult(images=[image], parameters={}, info={}, seeds=[])

    def _generate(self, path: str, payload: dict[str, Any], stage: str) -> GenerationResult:
        check_payload(path, payload)
        response = self._request("POST", path, stage, json=payload)
        data = self._json(response, stage)
        url = self._url(path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise WebUIProtocolError(
                "the WebUI's answer has no 'images' list",
                stage=stage,
                url=url,
                hint="is this an A1111-compatible WebUI started with --api, and send_images true?",
            )
        images = [self._decode_png(item, stage, url, n) for n, item in enumerate(data["images"])]
        info = self._parse_info(data.get("info"), stage, url)
        first = info.get("index_of_first_image")
        if isinstance(first, int) and 0 < first < len(images):  # drop a returned grid
            images = images[first:]
        parameters = data.get("parameters")
        return GenerationResult(
            images=images,
            parameters=parameters if isinstance(parameters, dict) else {},
            info=info,
            seeds=_seeds_from_info(info, len(images)),
        )

    # -- lists and probes ----------------------------------------------------------------

    def sd_models(self) -> list[dict[str, Any]]:
        """GET /sdapi/v1/sd-models."""
        return self._list("/sdapi/v1/sd-models", "sd-models")

    def samplers(self) -> list[dict[str, Any]]:
        """GET /sdapi/v1/samplers."""
        return self._list("/sdapi/v1/samplers", "samplers")

    def upscalers(self) -> list[dict[str, Any]]:
        """GET /sdapi/v1/upscalers."""
        return self._list("/sdapi/v1/upscalers", "upscalers")

    def schedulers(self) -> list[dict[str, Any]]:
        """GET /sdapi/v1/schedulers."""
        return self._list("/sdapi/v1/schedulers", "schedulers")

    def sd_vae(self) -> list[dict[str, Any]]:
        """GET /sdapi/v1/sd-vae."""
        return self._list("/sdapi/v1/sd-vae", "sd-vae")

    def ping(self) -> None:
        """Readiness probe (GET /sdapi/v1/sd-models) with the short connect timeout."""
        self._list("/sdapi/v1/sd-models", "ping", timeout=self._short_timeout())

    def progress(self) -> dict[str, Any]:
        """GET /sdapi/v1/progress?skip_current_image=true: whatever runs now."""
        response = self._request(
            "GET",
            "/sdapi/v1/progress",
            "progress",
            params={"skip_current_image": "true"},
            timeout=self._short_timeout(),
        )
        return self._dict(response, "progress")

    def task_progress(self, task_id: str) -> dict[str, Any]:
        """POST /internal/progress for one ``force_task_id``: active, queued, completed, ..."""
        response = self._request(
            "POST",
            "/internal/progress",
            "progress",
            json={"id_task": task_id, "id_live_preview": -1},
            timeout=self._short_timeout(),
        )
        return self._dict(response, "progress")

    def interrupt(self) -> None:
        """POST /sdapi/v1/interrupt: stops whatever generation runs now, whoever's it is."""
        self._request("POST", "/sdapi/v1/interrupt", "interrupt", timeout=self._short_timeout())

    def interrupt_task(self, task_id: str) -> bool:
        """Interrupt only if ``task_id`` is the active task right now; True if it was.

        A1111 has no per-task interrupt: this checks /internal/progress first, then interrupts.
        A tiny window remains between the two calls in which the task may end.
        """
        state = self.task_progress(task_id)
        if not state.get("active"):
            return False
        self.interrupt()
        logger.info("interrupted WebUI task %s", task_id)
        return True

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> WebUIClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------

    def _short_timeout(self) -> httpx.Timeout:
        read = min(self.read_timeout, 30.0)
        return httpx.Timeout(connect=self.connect_timeout, read=read, write=read, pool=read)

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _scrub(self, text: str) -> str:
        """``text`` without the password, without a trailing full stop (the hint follows)."""
        if self._secret and self._secret in text:
            text = text.replace(self._secret, "***")
        return text.strip().rstrip(".")

    def _request(
        self,
        method: str,
        path: str,
        stage: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        url = self._url(path)
        started = time.monotonic()
        try:
            response = self._http.request(
                method,
                path,
                json=json,
                params=params,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.ConnectTimeout as exc:
            raise WebUITimeoutError(
                f"the WebUI did not accept a connection within {self.connect_timeout:g}s",
                stage=stage,
                url=url,
                hint="check that the WebUI is running and reachable at this URL",
            ) from exc
        except httpx.TimeoutException as exc:
            limit = (timeout.read if timeout is not None else None) or self.read_timeout
            raise WebUITimeoutError(
                f"the WebUI did not answer within {limit:g}s",
                stage=stage,
                url=url,
                hint=(
                    "the WebUI may be hung, or busy with a long queue: check its console, "
                    "or raise STABLENEW_WEBUI_READ_TIMEOUT"
                ),
            ) from exc
        except httpx.ConnectError as exc:
            raise WebUIUnreachableError(
                "could not connect to the WebUI",
                stage=stage,
                url=url,
                detail=self._scrub(str(exc)) or None,
                hint=(
                    "start the WebUI with --api (and --listen when it runs on another machine), "
                    "or set STABLENEW_WEBUI_URL to where it listens"
                ),
            ) from exc
        except httpx.TransportError as exc:  # dropped, reset, closed without an answer
            raise WebUIUnreachableError(
                "the WebUI dropped the connection without a complete answer",
                stage=stage,
                url=url,
                detail=self._scrub(str(exc)) or None,
                hint="the WebUI process may have crashed or restarted: check its console, retry",
            ) from exc
        elapsed = time.monotonic() - started
        logger.debug("%s %s (%s) -> %s in %.3fs", method, url, stage, response.status_code, elapsed)
        if response.status_code >= 400 or response.status_code < 200:
            raise self._status_error(response, stage, url)
        return response

    def _status_error(self, response: httpx.Response, stage: str, url: str) -> WebUIError:
        status = response.status_code
        detail = self._scrub(_error_detail(response))
        if status in (401, 403):
            message = (
                "the WebUI refused the credentials"
                if self._user is not None
                else "the WebUI requires credentials"
            )
            return WebUIAuthError(
                f"{message} (HTTP {status})",
                stage=stage,
                url=url,
                status_code=status,
                detail=detail or None,
                hint=(
                    "set STABLENEW_WEBUI_USER and STABLENEW_WEBUI_PASSWORD to the user and "
                    "password of the WebUI's --api-auth"
                ),
            )
        if status in (502, 503, 504):
            return WebUIUnreachableError(
                f"the WebUI is not available (HTTP {status} from a proxy in front of it)",
                stage=stage,
                url=url,
                status_code=status,
                detail=detail or None,
                hint="check that the WebUI behind the proxy is running, then retry",
            )
        if status >= 500:
            lowered = detail.lower()
            if any(marker in lowered for marker in _OOM_MARKERS):
                return WebUIOutOfMemoryError(
                    f"the WebUI ran out of GPU memory (HTTP {status})",
                    stage=stage,
                    url=url,
                    status_code=status,
                    detail=detail or None,
                    hint=(
                        "lower width/height, batch_size or the hires scale, or start the WebUI "
                        "with --medvram"
                    ),
                )
            return WebUIGenerationError(
                f"the generation failed inside the WebUI (HTTP {status})",
                stage=stage,
                url=url,
                status_code=status,
                detail=detail or None,
                hint="the WebUI console has the traceback; fix the cause, then retry the job",
            )
        if 400 <= status < 500:
            if status == 404 and detail in ("", "Not Found"):
                hint = "is the WebUI started with --api, and is this the right URL?"
            elif status == 404:
                hint = "a sampler, upscaler, model or image named in the request does not exist"
            else:
                hint = "fix the request (the detail names the field); retrying cannot help"
            return WebUIRejectedError(
                f"the WebUI rejected the request (HTTP {status})",
                stage=stage,
                url=url,
                status_code=status,
                detail=detail or None,
                hint=hint,
            )
        return WebUIProtocolError(
            f"the WebUI answered HTTP {status}, which the A1111 API never sends here",
            stage=stage,
            url=url,
            status_code=status,
            hint="is this URL an A1111-compatible WebUI?",
        )

    def _json(self, response: httpx.Response, stage: str | None = None) -> Any:
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            snippet = _printable(self._scrub(response.text[:120])) or "(empty body)"
            raise WebUIProtocolError(
                "the WebUI answered something that is not JSON",
                stage=stage,
                url=str(response.request.url.copy_with(query=None)),
                status_code=response.status_code,
                detail=snippet,
                hint="is this URL an A1111-compatible WebUI started with --api?",
            ) from exc

    def _dict(self, response: httpx.Response, stage: str) -> dict[str, Any]:
        data = self._json(response, stage)
        if not isinstance(data, dict):
            raise WebUIProtocolError(
                "the WebUI answered JSON that is not an object",
                stage=stage,
                url=str(response.request.url.copy_with(query=None)),
                hint="is this URL an A1111-compatible WebUI?",
            )
        return data

    def _list(
        self, path: str, stage: str, *, timeout: httpx.Timeout | None = None
    ) -> list[dict[str, Any]]:
        response = self._request("GET", path, stage, timeout=timeout or self._short_timeout())
        data = self._json(response, stage)
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise WebUIProtocolError(
                "the WebUI answered something that is not a list of objects",
                stage=stage,
                url=self._url(path),
                hint="is this URL an A1111-compatible WebUI?",
            )
        return data

    def _decode_png(self, item: object, stage: str, url: str, index: int) -> bytes:
        if not isinstance(item, str):
            raise WebUIProtocolError(
                f"image {index} in the WebUI's answer is not a base64 string",
                stage=stage,
                url=url,
            )
        text = item.split(",", 1)[1] if item.startswith("data:") else item
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise WebUIProtocolError(
                f"image {index} in the WebUI's answer is not valid base64",
                stage=stage,
                url=url,
            ) from exc
        if not data.startswith(PNG_SIGNATURE):
            raise WebUIProtocolError(
                f"image {index} in the WebUI's answer is not a PNG",
                stage=stage,
                url=url,
                hint="set the WebUI's image file format (samples_format) to png",
            )
        return data

    def _parse_info(self, raw: object, stage: str, url: str) -> dict[str, Any]:
        if raw is None or raw == "":
            return {}
        if isinstance(raw, dict):
            return raw
        if isinstance(raw, str):
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise WebUIProtocolError(
                    "the WebUI's 'info' is not a JSON string",
                    stage=stage,
                    url=url,
                ) from exc
            if isinstance(parsed, dict):
                return parsed
        raise WebUIProtocolError("the WebUI's 'info' is not a JSON object", stage=stage, url=url)


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text).strip()


def _seeds_from_info(info: Mapping[str, Any], count: int) -> list[int]:
    seeds = info.get("all_seeds")
    if isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds):
        return [int(s) for s in seeds]
    seed = info.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [seed] * count
    return []


def _error_detail(response: httpx.Response) -> str:
    """The useful text of an error answer: FastAPI ``detail`` or A1111's ``errors``."""
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text.strip()[:_DETAIL_LIMIT]
    text = ""
    if isinstance(data, dict):
        detail = data.get("detail")
        if isinstance(detail, list):  # FastAPI validation errors
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    loc = ".".join(str(p) for p in item.get("loc", []))
                    parts.append(f"{loc}: {item.get('msg', '')}".strip(": "))
                else:
                    parts.append(str(item))
            text = "; ".join(parts)
        else:
            pieces = [
                str(data.get(key))
                for key in ("error", "detail", "errors")
                if data.get(key) not in (None, "")
            ]
            text = ": ".join(dict.fromkeys(pieces))
    else:
        text = str(data)
    return text[:_DETAIL_LIMIT]
