"""Settings through load_settings: every MLX_LORA_API_* variable, flags over them, bad values named."""

from pathlib import Path

import pytest

from mlx_lora_api.config import ENV_PREFIX, load_settings

ENVIRONMENT = {
    "DATA_DIR": ("/tmp/somewhere", Path("/tmp/somewhere")),
    "HOST": ("0.0.0.0", "0.0.0.0"),
    "PORT": ("8123", 8123),
    "DEFAULT_MODEL": ("my-model", "my-model"),
    "MODEL_ROOTS": ("/tmp/a:/tmp/b", [Path("/tmp/a"), Path("/tmp/b")]),
    "API_KEY": ("s3cret", "s3cret"),
    "ALLOWED_ORIGINS": ("https://a.example, http://b.example:8080,", ["https://a.example", "http://b.example:8080"]),
    "MAX_QUEUED_JOBS": ("7", 7),
    "MAX_BODY_BYTES": ("1024", 1024),
    "MAX_SAMPLES": ("10", 10),
    "MAX_SAMPLE_CHARS": ("99", 99),
    "MAX_SEQ_LENGTH_LIMIT": ("4096", 4096),
    "HUB_TIMEOUT": ("2.5", 2.5),
    "GENERATION_BUDGET_BYTES": ("1048576", 1048576),
    "SSE_KEEPALIVE_SECONDS": ("3", 3.0),
    "MAX_CONCURRENT_GENERATIONS": ("4", 4),
    "MAX_GENERATION_TOKENS": ("512", 512),
    "MEMORY_LIMIT": ("8589934592", 8 << 30),
    "RANKS": ("2", 2),
    "HOSTFILE": ("/tmp/hosts.json", Path("/tmp/hosts.json")),
}


@pytest.mark.parametrize("name", sorted(ENVIRONMENT))
def test_each_variable_is_read(name):
    raw, expected = ENVIRONMENT[name]
    settings = load_settings(environ={ENV_PREFIX + name: raw})
    assert getattr(settings, name.lower()) == expected


def test_every_setting_has_a_variable():
    from mlx_lora_api.config import _CONVERTERS

    assert set(_CONVERTERS) == {n.lower() for n in ENVIRONMENT}


def test_flags_win_over_the_environment_and_bad_values_are_named():
    settings = load_settings({"port": 9000, "host": None}, environ={"MLX_LORA_API_PORT": "8123"})
    assert settings.port == 9000 and settings.host == "127.0.0.1"
    with pytest.raises(ValueError, match="MLX_LORA_API_PORT='eighty' is not valid"):
        load_settings(environ={"MLX_LORA_API_PORT": "eighty"})


def test_allowed_origins_from_the_environment_let_those_pages_call(tmp_path):
    from starlette.testclient import TestClient

    from mlx_lora_api.web.app import create_app

    settings = load_settings(
        environ={"MLX_LORA_API_DATA_DIR": str(tmp_path), "MLX_LORA_API_ALLOWED_ORIGINS": "https://dash.example"}
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        assert client.get("/jobs", headers={"Origin": "https://dash.example"}).status_code == 200
        assert client.get("/jobs", headers={"Origin": "https://evil.example"}).status_code == 403
