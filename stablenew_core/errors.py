"""The one exception hierarchy of stablenew_core.

Every error the library raises on purpose derives from :class:`StablenewError`, so callers can
catch the family at once, or one kind precisely. WebUI errors carry the stage and URL they came
from and a hint of what to do, and say whether retrying can help (:attr:`WebUIError.transient`).
"""

from __future__ import annotations


class StablenewError(Exception):
    """Base class of every error raised by stablenew_core."""


class ConfigError(StablenewError, ValueError):
    """A configuration, job or option value is invalid; the message names the field."""


class RunModeError(ConfigError):
    """A run mode that is neither ``direct`` nor ``queue`` where no fallback is allowed."""


class PackError(StablenewError, ValueError):
    """A prompt pack is malformed; the message names the file, the line or JSON path."""


class JobNotFoundError(StablenewError, LookupError):
    """No job with that id is recorded."""


class JobStateError(StablenewError):
    """The job is in a state that does not allow the requested operation."""


class ServerError(StablenewError):
    """The Prefect server could not be reached, started or configured."""


class DeploymentMissingError(ServerError):
    """The pipeline deployment or its work pool does not exist yet (run ``stablenew deploy``)."""


class JobCancelledError(StablenewError):
    """The job was cancelled while it ran; raised at the next safe point."""


class WebUIError(StablenewError):
    """A call to the WebUI failed.

    ``stage`` is the pipeline stage (or endpoint purpose) that made the call, ``url`` the URL
    called, ``hint`` what the user can do about it. ``transient`` errors (unreachable, timeout,
    dropped connection) may succeed when retried; the others will not.
    """

    transient: bool = False
    kind: str = "webui_error"

    def __init__(
        self,
        message: str,
        *,
        stage: str | None = None,
        url: str | None = None,
        hint: str | None = None,
        status_code: int | None = None,
        detail: str | None = None,
    ) -> None:
        self.message = message
        self.stage = stage
        self.url = url
        self.hint = hint
        self.status_code = status_code
        self.detail = detail
        super().__init__(self._compose())

    def _compose(self) -> str:
        where = []
        if self.stage:
            where.append(f"stage {self.stage}")
        if self.url:
            where.append(self.url)
        text = self.message
        if where:
            text = f"{text} ({', '.join(where)})"
        if self.detail:
            text = f"{text}: {self.detail}"
        if self.hint:
            text = f"{text}. {self.hint}"
        return text

    def __reduce__(self) -> tuple[object, ...]:
        # Keep keyword details across pickling (Prefect persists task failures).
        return (
            _rebuild_webui_error,
            (
                type(self),
                self.message,
                {
                    "stage": self.stage,
                    "url": self.url,
                    "hint": self.hint,
                    "status_code": self.status_code,
                    "detail": self.detail,
                },
            ),
        )


def _rebuild_webui_error(
    cls: type[WebUIError], message: str, kwargs: dict[str, object]
) -> WebUIError:
    return cls(message, **kwargs)  # type: ignore[arg-type]


class WebUIUnreachableError(WebUIError):
    """The WebUI refused or dropped the connection (not running, wrong URL, process died)."""

    transient = True
    kind = "unreachable"


class WebUITimeoutError(WebUIError):
    """The WebUI did not answer within the configured timeout."""

    transient = True
    kind = "timeout"


class WebUIRejectedError(WebUIError):
    """The WebUI rejected the request (HTTP 4xx): retrying the same request cannot help."""

    kind = "rejected"


class WebUIAuthError(WebUIRejectedError):
    """The WebUI asked for credentials, or refused the ones given (HTTP 401/403)."""

    kind = "auth"


class WebUIGenerationError(WebUIError):
    """The generation itself failed inside the WebUI (HTTP 500)."""

    kind = "generation_failed"


class WebUIOutOfMemoryError(WebUIGenerationError):
    """The WebUI ran out of GPU memory: retry with a smaller size or batch."""

    kind = "out_of_memory"


class WebUIProtocolError(WebUIError):
    """The WebUI answered something that is not the A1111 protocol (not JSON, bad image, ...)."""

    kind = "protocol"
