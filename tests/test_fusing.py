import json
import os

import mlx.core as mx
import pytest
from mlx_lm.utils import load

from mlx_lora_api.tasks import finetune
from mlx_lora_api.tasks import fuse as fusing
from mlx_lora_api.types import FinetuneRequest, Parameters


@pytest.fixture(params=["lora", "dora"])
def trained(request, tmp_path, tiny_model_template):
    out = tmp_path / "adapter"
    out.mkdir()
    req = FinetuneRequest(
        base_model="tiny-base",
        training_data=["The mayor of Zorbington is Elara Quintfeather."],
        parameters=Parameters(learning_rate=2e-3, epochs=10, fine_tune_type=request.param),
    )
    finetune.train_adapter(str(tiny_model_template), "tiny-base", req, out)
    return tiny_model_template, out


def test_fused_model_computes_what_base_plus_adapter_computes(tmp_path, trained):
    base, adapter = trained
    out = tmp_path / "fused"
    out.mkdir()
    parity = fusing.fuse_adapter(str(base), adapter, out)

    with_adapter, tokenizer = load(str(base), adapter_path=str(adapter))
    fused, _ = load(str(out))
    plain, _ = load(str(base))
    tokens = mx.array([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    expected = with_adapter(tokens)
    assert mx.allclose(fused(tokens), expected, atol=1e-4).item()
    assert not mx.allclose(plain(tokens), expected, atol=1e-2).item()  # the adapter changed something
    assert parity["max_diff"] < 1e-5 and parity["dtype"] == "float32" and parity["fused_layers"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and (out / "tokenizer.json").exists()
    assert not any("lora" in k for k in mx.load(str(out / "model.safetensors")))


def test_a_fuse_that_breaks_parity_is_refused(tmp_path, trained, monkeypatch):
    base, adapter = trained
    monkeypatch.setitem(fusing.LAYER_RTOL, "float32", -1.0)  # nothing can pass
    with pytest.raises(fusing.ParityError, match="differ from base plus adapter"):
        fusing.fuse_adapter(str(base), adapter, tmp_path)
    assert not list(tmp_path.glob("model*"))  # nor a partial file


def test_jobs_that_write_weights_ask_mlx_for_full_float32(monkeypatch):
    """MLX computes float32 matmuls in TF32 on CUDA and M5 GPUs unless MLX_ENABLE_TF32=0 when the
    process first multiplies: a fuse checked to float32's tolerance would be refused there."""
    from mlx_lora_api.jobs import process

    for kind, expected in [("finetune", None), ("fuse", "0"), ("quantize", "0"), ("export", "0")]:
        monkeypatch.delenv("MLX_ENABLE_TF32", raising=False)
        process.set_precision(kind)
        assert os.environ.get("MLX_ENABLE_TF32") == expected, kind
