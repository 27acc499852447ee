"""WebUIClient against the simulator process over real HTTP: answers, field checks, errors."""

from __future__ import annotations

import base64
import io
import socket

import pytest
from PIL import Image
from pydantic import SecretStr

from stablenew_core.errors import (
    ConfigError,
    WebUIError,
    WebUIGenerationError,
    WebUIOutOfMemoryError,
    WebUIProtocolError,
    WebUIRejectedError,
    WebUITimeoutError,
    WebUIUnreachableError,
)
from stablenew_core.settings import Settings
from stablenew_core.webui.client import (
    EXTRAS_SINGLE_IMAGE_FIELDS,
    IMG2IMG_FIELDS,
    PNG_SIGNATURE,
    TXT2IMG_FIELDS,
    WebUIClient,
)
from stablenew_core.webui.process import SimulatorProcess


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def _assert_clean(sim: SimulatorProcess) -> None:
    generations = sim.stats()["generations"]
    assert generations, "the simulator saw no generation"
    assert [g["unknown_fields"] for g in generations] == [[] for _ in generations]


def test_field_sets_hold_the_a1111_names_the_pipeline_uses() -> None:
    for name in ("prompt", "seed", "override_settings", "force_task_id", "alwayson_scripts"):
        assert name in TXT2IMG_FIELDS and name in IMG2IMG_FIELDS
    assert {"enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps"} <= TXT2IMG_FIELDS
    assert {"init_images", "denoising_strength", "mask", "include_init_images"} <= IMG2IMG_FIELDS
    assert "init_images" not in TXT2IMG_FIELDS
    assert {"image", "upscaling_resize", "upscaler_1", "resize_mode"} <= EXTRAS_SINGLE_IMAGE_FIELDS
    assert "force_task_id" not in EXTRAS_SINGLE_IMAGE_FIELDS


def test_txt2img_returns_decoded_pngs_parsed_info_and_real_seeds(
    client: WebUIClient, sim: SimulatorProcess
) -> None:
    result = client.txt2img(
        {
            "prompt": "a lighthouse",
            "negative_prompt": "fog",
            "seed": -1,
            "steps": 4,
            "batch_size": 2,
            "n_iter": 2,
            "width": 64,
            "height": 96,
            "force_task_id": "client-t2i",
        }
    )
    assert len(result.images) == 4
    assert all(_png_size(image) == (64, 96) for image in result.images)
    assert isinstance(result.info, dict) and result.info["all_prompts"] == ["a lighthouse"] * 4
    first = result.info["seed"]
    assert first != -1 and result.seeds == [first, first + 1, first + 2, first + 3]
    assert len(result.infotexts) == 4
    assert result.infotexts[0].startswith("a lighthouse\nNegative prompt: fog\nSteps: 4, ")
    assert f"Seed: {first}, Size: 64x96" in result.infotexts[0]
    assert result.parameters["prompt"] == "a lighthouse"
    assert client.task_progress("client-t2i")["completed"] is True
    _assert_clean(sim)


def test_same_seed_and_prompt_give_the_same_image(client: WebUIClient) -> None:
    payload = {"prompt": "same", "seed": 42, "steps": 2, "width": 64, "height": 64}
    assert client.txt2img(payload).images == client.txt2img(payload).images
    other = client.txt2img({**payload, "seed": 43}).images
    assert other != client.txt2img(payload).images


def test_img2img_and_extras_sizes(client: WebUIClient, sim: SimulatorProcess) -> None:
    source = client.txt2img({"prompt": "p", "seed": 7, "steps": 2, "width": 64, "height": 64})
    init = base64.b64encode(source.images[0]).decode()
    same = client.img2img({"prompt": "p", "init_images": [init], "seed": 7, "steps": 4})
    assert _png_size(same.images[0]) == (64, 64) and same.seeds == [7]
    bigger = client.img2img(
        {"prompt": "p", "init_images": [init], "width": 128, "height": 80, "steps": 4}
    )
    assert _png_size(bigger.images[0]) == (128, 80)
    extras = client.extra_single_image(
        {"image": init, "resize_mode": 0, "upscaling_resize": 2, "upscaler_1": "R-ESRGAN 4x+"}
    )
    assert len(extras.images) == 1 and extras.info == {} and extras.parameters == {}
    assert _png_size(extras.images[0]) == (128, 128)
    _assert_clean(sim)


def test_lists_ping_and_idle_progress(client: WebUIClient) -> None:
    client.ping()
    models = client.sd_models()
    assert models and {"title", "model_name", "hash", "filename"} <= set(models[0])
    assert "Euler a" in [s["name"] for s in client.samplers()]
    assert "R-ESRGAN 4x+" in [u["name"] for u in client.upscalers()]
    assert "karras" in [s["name"] for s in client.schedulers()]
    assert client.sd_vae()
    state = client.progress()
    assert state["progress"] == 0 and state["state"]["sampling_steps"] == 0


def test_a_misspelt_field_is_refused_before_anything_is_sent(
    client: WebUIClient, sim: SimulatorProcess
) -> None:
    with pytest.raises(ValueError, match="sampler"):
        client.txt2img({"prompt": "p", "sampler": "Euler a"})
    with pytest.raises(ValueError, match="init_images"):
        client.txt2img({"prompt": "p", "init_images": []})
    with pytest.raises(ValueError, match="force_task_id"):
        client.extra_single_image({"image": "", "force_task_id": "x"})
    unit = {"ad_model": "face_yolov8n.pt", "ad_strength": 0.4}
    with pytest.raises(ValueError, match=r"ADetailer\.args\[0\]\.ad_strength"):
        client.img2img(
            {"prompt": "p", "init_images": [], "alwayson_scripts": {"ADetailer": {"args": [unit]}}}
        )
    assert sim.stats()["generations"] == []


@pytest.mark.parametrize(
    ("kind", "error", "transient"),
    [
        ("500", WebUIGenerationError, False),
        ("oom", WebUIOutOfMemoryError, False),
        ("drop", WebUIUnreachableError, True),
        ("garbage", WebUIProtocolError, False),
        ("422", WebUIRejectedError, False),
    ],
)
def test_each_fault_maps_to_its_error(
    client: WebUIClient,
    sim: SimulatorProcess,
    kind: str,
    error: type[WebUIError],
    transient: bool,
) -> None:
    sim.inject(kind, 1, routes=["img2img"])
    client.txt2img({"prompt": "not this route", "steps": 1, "width": 64, "height": 64})
    init = base64.b64encode(
        client.txt2img({"prompt": "p", "steps": 1, "width": 64, "height": 64}).images[0]
    ).decode()
    with pytest.raises(error) as caught:
        client.img2img({"prompt": "p", "init_images": [init], "steps": 1}, stage="adetailer")
    exc = caught.value
    assert type(exc) is error
    assert exc.stage == "adetailer" and exc.url == f"{sim.url}/sdapi/v1/img2img"
    assert "stage adetailer" in str(exc) and f"{sim.url}/sdapi/v1/img2img" in str(exc)
    assert exc.hint and exc.transient is transient
    # the fault was used up: the same request now works
    assert client.img2img({"prompt": "p", "init_images": [init], "steps": 1}).images
    outcomes = [g["outcome"] for g in sim.stats()["generations"]]
    assert outcomes == ["ok", "ok", kind, "ok"]


def test_oom_text_and_detail_reach_the_message(client: WebUIClient, sim: SimulatorProcess) -> None:
    sim.inject("oom", 1)
    with pytest.raises(WebUIOutOfMemoryError) as caught:
        client.txt2img({"prompt": "p", "steps": 1})
    assert "CUDA out of memory" in str(caught.value)
    assert caught.value.status_code == 500


def test_a_hanging_webui_times_out(sim: SimulatorProcess) -> None:
    sim.inject("hang", 1)
    with WebUIClient(sim.url, read_timeout=0.3) as impatient:
        with pytest.raises(WebUITimeoutError) as caught:
            impatient.txt2img({"prompt": "p", "steps": 1}, stage="txt2img")
        assert caught.value.transient and f"{sim.url}/sdapi/v1/txt2img" in str(caught.value)
        # the simulator is still usable afterwards
        assert impatient.txt2img({"prompt": "p", "steps": 1, "width": 64, "height": 64}).images
    assert [g["outcome"] for g in sim.stats()["generations"]] == ["hang", "ok"]


def test_a_malformed_body_is_rejected_with_the_field_named(client: WebUIClient) -> None:
    with pytest.raises(WebUIRejectedError) as caught:
        client.txt2img({"prompt": "p", "steps": "twenty"})
    assert caught.value.status_code == 422 and "steps" in str(caught.value)
    with pytest.raises(WebUIRejectedError, match="Sampler not found"):
        client.txt2img({"prompt": "p", "sampler_name": "No Such Sampler"})
    with pytest.raises(WebUIRejectedError, match="Init image not found"):
        client.img2img({"prompt": "p"})


def test_nothing_listening_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # the port is closed again: nothing listens there
    with (
        WebUIClient(f"http://127.0.0.1:{port}", connect_timeout=2.0) as client,
        pytest.raises(WebUIUnreachableError) as caught,
    ):
        client.ping()
    assert caught.value.transient
    assert f"http://127.0.0.1:{port}/sdapi/v1/sd-models" in str(caught.value)
    assert "--api" in str(caught.value)


def test_credentials_in_the_url_move_out_of_the_url() -> None:
    client = WebUIClient("http://someone:hunter2@127.0.0.1:9/")
    try:
        assert client.base_url == "http://127.0.0.1:9"
        assert "hunter2" not in repr(client)
    finally:
        client.close()


def test_from_settings_takes_url_timeouts_and_credentials() -> None:
    settings = Settings(
        webui_url="http://127.0.0.1:7861/",
        webui_user="u",
        webui_password=SecretStr("pw-1234"),
        webui_read_timeout=12.0,
    )
    with WebUIClient.from_settings(settings) as client:
        assert client.base_url == "http://127.0.0.1:7861"
        assert client.read_timeout == 12.0
        assert "pw-1234" not in repr(client)
    with pytest.raises(ConfigError):
        WebUIClient.from_settings(Settings(webui_user="u"))
