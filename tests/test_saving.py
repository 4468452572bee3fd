"""tasks/saving.py: mlx-lm's model folder, written one tensor at a time."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import get_total_parameters, load
from mlx_lm.utils import save as mlx_lm_save
from safetensors import safe_open

from mlx_lora_api.tasks import saving


def test_a_lazy_model_is_saved_as_mlx_lm_saves_it(tmp_path, tiny_model_template):
    theirs, ours = tmp_path / "mlx_lm", tmp_path / "ours"
    ours.mkdir()
    model, tokenizer, config = load(str(tiny_model_template), return_config=True)
    model.set_dtype(mx.bfloat16)  # which numpy cannot hold; and one weight in float32
    model.model.norm.weight = model.model.norm.weight.astype(mx.float32)
    mlx_lm_save(theirs, tiny_model_template, model, tokenizer, dict(config), donate_model=False)

    lazy, tokenizer, config = load(str(tiny_model_template), return_config=True, lazy=True)
    lazy.set_dtype(mx.bfloat16)
    lazy.model.norm.weight = lazy.model.norm.weight.astype(mx.float32)
    weights = dict(tree_flatten(lazy.parameters()))
    saving.save(
        ours, tiny_model_template, weights, tokenizer, dict(config), total_parameters=get_total_parameters(lazy)
    )

    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for name in ["config.json", "model.safetensors.index.json", "tokenizer_config.json"]:
        assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), name
    expected, got = mx.load(str(theirs / "model.safetensors")), mx.load(str(ours / "model.safetensors"))
    assert got.keys() == expected.keys() and got["model.norm.weight"].dtype == mx.float32
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and mx.array_equal(got[key], value).item(), key
    # The safetensors library reads the file too (its header padded as that library pads it).
    with safe_open(str(ours / "model.safetensors"), framework="np") as f:
        assert set(f.keys()) == expected.keys() and f.metadata() == {"format": "mlx"}
        assert (f.get_tensor("model.norm.weight") == expected["model.norm.weight"]).all()
    assert mx.load(str(ours / "model.safetensors"), return_metadata=True)[1] == {"format": "mlx"}


def _lazy_weights(count: int) -> dict[str, mx.array]:
    """`count` weights of 4 MiB each, computed only when evaluated."""
    return {f"layers.{i}.weight": mx.random.normal((1024, 1024), key=mx.random.key(i)) for i in range(count)}


def test_weights_are_computed_written_and_freed_one_at_a_time(tmp_path, tiny_model_template):
    _, tokenizer, config = load(str(tiny_model_template), return_config=True, lazy=True)
    checks = {"layers.3.weight": [mx.sum(mx.random.normal((1024, 1024), key=mx.random.key(3)))]}
    expected = _lazy_weights(16)
    mx.eval(expected)
    mx.reset_peak_memory()
    before = mx.get_active_memory()

    saving.save(
        tmp_path, tiny_model_template, _lazy_weights(16), tokenizer, config, total_parameters=16 << 20, with_each=checks
    )

    # All 16 at once would be 64 MiB; one at a time, one 4 MiB weight (and the check's own).
    assert mx.get_peak_memory() - before < 12 << 20
    assert mx.get_active_memory() - before < 1 << 20  # nothing kept
    assert checks["layers.3.weight"][0].item() == pytest.approx(mx.sum(expected["layers.3.weight"]).item(), rel=1e-5)
    got = mx.load(str(tmp_path / "model.safetensors"))
    assert all(mx.array_equal(got[name], value).item() for name, value in expected.items())


def test_weights_refused_before_commit_or_unwritable_leave_nothing_behind(tmp_path, tiny_model_template):
    _, tokenizer, config = load(str(tiny_model_template), return_config=True, lazy=True)

    def refuse():
        raise RuntimeError("the check failed")

    with pytest.raises(RuntimeError, match="the check failed"):
        saving.save(
            tmp_path, tiny_model_template, _lazy_weights(2), tokenizer, config, total_parameters=0, before_commit=refuse
        )
    assert list(tmp_path.iterdir()) == []

    weights = {"a": mx.zeros((2,)), "layers.1.odd": mx.zeros((2,), dtype=mx.complex64)}
    with pytest.raises(ValueError, match=r"weight 'layers.1.odd' is .*complex64.*safetensors cannot hold"):
        saving.save(tmp_path, tiny_model_template, weights, tokenizer, config, total_parameters=0)
    assert list(tmp_path.iterdir()) == []
