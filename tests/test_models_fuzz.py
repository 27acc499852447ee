"""Bad input gets a clear error: fuzzing the models (only ValidationError escapes), and the CLI
naming the field and the bad value."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from stablenew_core import Job, PipelineConfig
from stablenew_core.cli import app

FIELDS = [*PipelineConfig.model_fields, "unknown_field", "prompt"]
SECTIONS = ["hires", "img2img", "adetailer", "upscale"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=6,
)
section_dicts = st.dictionaries(
    st.sampled_from(["enabled", "scale", "steps", "denoising_strength", "mode", "factor", "x"]),
    values,
    max_size=4,
)
config_dicts = st.dictionaries(
    st.sampled_from(FIELDS),
    st.one_of(values, section_dicts),
    max_size=8,
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_dicts)
def test_config_validation_only_ever_raises_validation_error(data: dict[str, Any]) -> None:
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        assert exc.errors(), "a validation error names what is wrong"
        return
    assert config.width % 8 == 0 and config.height % 8 == 0
    assert PipelineConfig.model_validate(config.to_dict()) == config


job_dicts = st.fixed_dictionaries(
    {"config": st.one_of(config_dicts, st.just({"prompt": "ok"}))},
    optional={
        "job_id": st.one_of(st.text(max_size=70), values),
        "created_at": st.one_of(st.datetimes(), st.text(max_size=30), values),
        "run_mode": st.one_of(st.sampled_from(["direct", "QUEUE", " queue ", "fast"]), values),
        "source": st.one_of(st.sampled_from(["run", "run_now", "gui"]), values),
        "prompt_source": st.one_of(st.sampled_from(["manual", "pack", "x"]), values),
        "prompt_pack_id": values,
        "config_snapshot": values,
        "priority": st.one_of(st.sampled_from(["high", "low", "urgent"]), values),
    },
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job_dicts)
@example({"config": {"prompt": "ok"}, "config_snapshot": {"": float("inf")}})  # found by the fuzz
def test_job_validation_only_ever_raises_validation_error(data: dict[str, Any]) -> None:
    try:
        job = Job.model_validate(data)
    except ValidationError:
        return
    assert job.created_at.utcoffset() is not None
    assert Job.model_validate(job.model_dump(mode="json")) == job


def test_cli_names_the_field_and_the_bad_value() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["run", "a cat", "--width", "513"])
    assert result.exit_code == 2
    assert "width" in result.output and "513" in result.output
    result = runner.invoke(app, ["queue", "a cat", "--priority", "urgent"])
    assert result.exit_code == 2 and "urgent" in result.output and "priority" in result.output
    result = runner.invoke(app, ["history", "--mode", "fast"])
    assert result.exit_code == 2 and "fast" in result.output
    result = runner.invoke(app, ["run", "   "])
    assert result.exit_code == 2 and "prompt" in result.output
    result = runner.invoke(app, ["retry", "abc", "--set", "novalue"])
    assert result.exit_code == 2 and "FIELD=VALUE" in result.output


def test_cli_names_a_bad_setting_but_never_echoes_its_value() -> None:
    secret_like = "hunter2-not-a-port"
    result = CliRunner().invoke(
        app, ["history"], env={"STABLENEW_SERVER_PORT": secret_like}, catch_exceptions=False
    )
    assert result.exit_code == 2
    assert "server_port" in result.output and "invalid setting" in result.output
    assert secret_like not in result.output
