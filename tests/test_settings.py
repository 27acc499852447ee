"""Settings: one typed object from STABLENEW_* variables; credentials kept out of URLs and reprs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from stablenew_core.settings import Settings, settings_env


def test_reads_the_environment_with_the_stablenew_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STABLENEW_HOME", str(tmp_path))
    monkeypatch.setenv("STABLENEW_WEBUI_URL", "http://127.0.0.1:7861/")
    monkeypatch.setenv("STABLENEW_OUTPUT_DIR", str(tmp_path / "imgs"))
    settings = Settings()
    assert settings.home == tmp_path
    assert settings.webui_url == "http://127.0.0.1:7861"
    assert settings.outputs == tmp_path / "imgs"
    assert (
        Settings(
            **{k.removeprefix("STABLENEW_").lower(): v for k, v in settings_env(settings).items()}
        )
        == settings
    )


def test_credentials_in_the_webui_url_move_to_the_secret_fields() -> None:
    settings = Settings(webui_url="http://artist:s3cr%40t@127.0.0.1:7860")
    assert settings.webui_url == "http://127.0.0.1:7860"
    assert settings.webui_user == "artist"
    assert settings.webui_password is not None
    assert settings.webui_password.get_secret_value() == "s3cr@t"
    assert "s3cr" not in repr(settings) and "s3cr" not in str(settings.model_dump())


def test_a_bad_url_is_an_error_that_names_the_field_without_the_password() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(webui_url="ftp://artist:hunter2@example")
    text = str(caught.value)
    assert "webui_url" in text and "hunter2" not in text
