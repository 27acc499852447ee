"""Settings: the one typed configuration object of stablenew_core.

Read from the environment with the prefix ``STABLENEW_`` (``STABLENEW_HOME``,
``STABLENEW_WEBUI_URL``, ``STABLENEW_OUTPUT_DIR``, ...) and overridable by CLI options.
Credentials are :class:`~pydantic.SecretStr`: they never print, and never reach a log, tag,
snapshot or flow-run parameter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

CrashPolicy = Literal["resume_once", "never"]


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _default_home() -> Path:
    return Path.home() / ".stablenew"


class Settings(BaseSettings):
    """Everything configurable, in one place."""

    model_config = SettingsConfigDict(
        env_prefix="STABLENEW_",
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,  # a bad value may be a credential: messages say it safely
    )

    home: Path = Field(default_factory=_default_home, description="Data directory.")
    output_dir: Path | None = Field(
        default=None, description="Where images land; default <home>/outputs."
    )

    # The WebUI (AUTOMATIC1111, Forge, SD.Next started with --api).
    webui_url: str = "http://127.0.0.1:7860"
    webui_user: str | None = None
    webui_password: SecretStr | None = None
    webui_connect_timeout: float = Field(default=5.0, gt=0)
    webui_read_timeout: float = Field(
        default=900.0, gt=0, description="A request waits behind the WebUI's global lock."
    )
    progress_poll_seconds: float = Field(default=0.5, gt=0)

    # Prefect.
    prefect_api_url: str | None = Field(
        default=None,
        description="A Prefect server to use; default PREFECT_API_URL, else the local server.",
    )
    prefect_api_key: SecretStr | None = None
    server_host: str = "127.0.0.1"
    server_port: int = Field(default=4280, ge=1, le=65535)
    database_url: SecretStr | None = Field(
        default=None,
        description="postgresql+asyncpg://... for a PostgreSQL-backed server; default SQLite.",
    )
    server_start_timeout: float = Field(default=90.0, gt=0)
    work_pool: str = "stablenew"
    deployment_name: str = "stablenew"

    # The queue worker.
    worker_name: str | None = None
    worker_poll_seconds: float = Field(default=0.2, gt=0)
    worker_heartbeat_seconds: float = Field(default=15.0, gt=0)

    # Reliability.
    transient_retries: int = Field(default=2, ge=0, le=20)
    retry_backoff_seconds: float = Field(default=2.0, ge=0)
    crash_policy: CrashPolicy = "resume_once"
    webhook_url: str | None = Field(
        default=None, description="POSTed a JSON body on every terminal job state."
    )
    webhook_attempts: int = Field(default=4, ge=1, le=20)
    webhook_backoff_seconds: float = Field(default=0.5, ge=0)

    @field_validator("webui_url", "prefect_api_url", "webhook_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(
                f"must start with http:// or https://, got {_without_userinfo(value)!r}"
            )
        return value or None

    @model_validator(mode="after")
    def _credentials_out_of_the_webui_url(self) -> Settings:
        """``http://user:pass@host`` becomes the URL plus webui_user/webui_password, so the
        password never travels in a URL that gets printed or logged."""
        parts = urlsplit(self.webui_url)
        if parts.username is None and parts.password is None:
            return self
        object.__setattr__(self, "webui_url", _without_userinfo(self.webui_url))
        if self.webui_user is None and parts.username:
            object.__setattr__(self, "webui_user", unquote(parts.username))
        if self.webui_password is None and parts.password:
            object.__setattr__(self, "webui_password", SecretStr(unquote(parts.password)))
        return self

    @property
    def outputs(self) -> Path:
        """The output root directory."""
        return self.output_dir if self.output_dir is not None else self.home / "outputs"

    @property
    def prefect_home(self) -> Path:
        """PREFECT_HOME of the local server and of every process the project launches."""
        return self.home / "prefect"

    @property
    def local_api_url(self) -> str:
        """The API URL of the local server this project starts."""
        return f"http://{self.server_host}:{self.server_port}/api"

    def api_url(self) -> str:
        """The Prefect API to talk to: the setting, else PREFECT_API_URL, else the local one."""
        return self.prefect_api_url or os.environ.get("PREFECT_API_URL") or self.local_api_url

    def uses_local_server(self) -> bool:
        """True when the API URL is the one of the server this project starts."""
        return self.api_url().rstrip("/") == self.local_api_url


def get_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with explicit overrides (``None`` values are ignored)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as ``STABLENEW_*`` environment variables, for a child process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"STABLENEW_{name.upper()}"] = str(value)
    return env
