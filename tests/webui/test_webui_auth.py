"""Basic auth (A1111's --api-auth) on every route; the password never leaks."""

from __future__ import annotations

import logging

import httpx
import pytest
from pydantic import SecretStr

from stablenew_core.errors import WebUIAuthError
from stablenew_core.settings import Settings
from stablenew_core.webui.client import WebUIClient
from stablenew_core.webui.process import SimulatorProcess

WRONG = "wrong-password-123"


def test_right_credentials_work(
    auth_sim: SimulatorProcess, sim_credentials: tuple[str, str]
) -> None:
    user, password = sim_credentials
    settings = Settings(webui_url=auth_sim.url, webui_user=user, webui_password=SecretStr(password))
    with WebUIClient.from_settings(settings) as client:
        client.ping()
        result = client.txt2img({"prompt": "p", "steps": 1, "width": 64, "height": 64})
        assert len(result.images) == 1
        assert client.task_progress("nobody")["active"] is False
        assert password not in repr(client)


@pytest.mark.parametrize("wrong", [False, True])
def test_missing_or_wrong_credentials_are_an_auth_error(
    auth_sim: SimulatorProcess,
    sim_credentials: tuple[str, str],
    wrong: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    user, password = sim_credentials
    auth = (user, WRONG) if wrong else None
    with WebUIClient(auth_sim.url, auth=auth) as client:
        with pytest.raises(WebUIAuthError) as caught:
            client.txt2img({"prompt": "p", "steps": 1}, stage="txt2img")
        exc = caught.value
        assert exc.status_code == 401 and not exc.transient
        text = str(exc)
        assert "stage txt2img" in text and f"{auth_sim.url}/sdapi/v1/txt2img" in text
        assert "STABLENEW_WEBUI_USER" in text
        for secret in (password, WRONG):
            assert secret not in text
            assert secret not in repr(exc)
            assert secret not in repr(client)
            assert secret not in caplog.text
        with pytest.raises(WebUIAuthError):
            client.ping()


def test_every_route_is_guarded(auth_sim: SimulatorProcess) -> None:
    with httpx.Client(base_url=auth_sim.url) as raw:
        for method, path in [
            ("GET", "/sdapi/v1/sd-models"),
            ("GET", "/sdapi/v1/progress"),
            ("POST", "/internal/progress"),
            ("POST", "/sdapi/v1/interrupt"),
            ("GET", "/sim/stats"),
        ]:
            answer = raw.request(method, path, json={})
            assert answer.status_code == 401, path
            assert answer.headers["www-authenticate"] == "Basic"
