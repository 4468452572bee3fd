"""The CPU kernels against MLX's own ops: values and gradients."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu as mlx_swiglu

from mlx_lora_api import cpu_head, cpu_ops


def test_exp_is_float32_accurate_over_its_whole_range():
    x = np.concatenate([np.linspace(-87.3, 88.37, 400_001, dtype=np.float32), [0.0, -1e-8, 1e-8, 1.0, -1.0]])
    got = np.asarray(cpu_ops.exp(mx.array(x))).astype(np.float64)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - exact) / exact) < 3e-7  # about 2 ulp
    edges = cpu_ops.exp(mx.array([-1000.0, -mx.inf, -88.0, 89.0, mx.inf]))
    assert edges[:3].tolist() == [0.0, 0.0, 0.0] and np.isfinite(np.asarray(edges[3:])).all()


def test_softmax_and_swiglu_match_mlx():
    x = mx.random.normal((3, 5, 40)) * 6
    assert mx.allclose(cpu_ops.softmax(x), mx.softmax(x, axis=-1), atol=1e-6).item()
    masked = mx.where(mx.arange(40) < 20, x, -mx.inf)
    assert mx.allclose(cpu_ops.softmax(masked), mx.softmax(masked, axis=-1), atol=1e-6).item()
    gate, up = mx.random.normal((2, 7, 48)) * 30, mx.random.normal((2, 7, 48))
    assert mx.allclose(cpu_ops.swiglu(gate, up), mlx_swiglu(gate, up), atol=1e-5).item()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [1, 3])
def test_attention_matches_mlx_fast_sdpa(causal, kv_heads):
    q, k, v = (mx.random.normal((2, 6, 9, 16)), mx.random.normal((2, kv_heads, 9, 16)),
               mx.random.normal((2, kv_heads, 9, 16)))
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal" if causal else None)
    assert mx.allclose(cpu_ops.attention(q, k, v, 0.25, causal), expected, atol=1e-5).item()


def test_cpu_head_is_mlx_cross_entropy_over_the_counted_rows():
    hidden, weight = mx.random.normal((12, 16)), mx.random.normal((50, 16))
    targets = mx.random.randint(0, 50, (12,))
    mask = mx.array([True] * 9 + [False] * 3)

    def reference(h):
        return nn.losses.cross_entropy(h @ weight.T, targets) * mask

    def ours(h):
        return cpu_head.cross_entropy(h, weight, targets, mask)

    assert mx.allclose(ours(hidden), reference(hidden), atol=1e-5).item()
    assert (ours(hidden)[9:] == 0).all().item()
    scale = mx.arange(12).astype(mx.float32)
    expected = mx.grad(lambda h: (reference(h) * scale).sum())(hidden)
    got = mx.grad(lambda h: (ours(h) * scale).sum())(hidden)
    assert mx.allclose(got, expected, atol=1e-5).item()
    assert (got[9:] == 0).all().item()
    nothing = mx.zeros((12,), mx.bool_)
    assert (cpu_head.cross_entropy(hidden, weight, targets, nothing) == 0).all().item()
    assert (mx.grad(lambda h: cpu_head.cross_entropy(h, weight, targets, nothing).sum())(hidden) == 0).all().item()


def test_cpu_head_only_where_it_computes_the_models_logits(tiny_model_template):
    from mlx_lm.utils import load

    from mlx_lora_api import training
    from mlx_lora_api.schemas import Parameters

    model, _ = load(str(tiny_model_template))
    model.set_dtype(mx.float32)
    training.prepare_model(model, Parameters(), num_layers=1)
    assert cpu_head.output_weight(model) is not None
    model.model.embed_tokens.unfreeze()
    assert cpu_head.output_weight(model) is None  # the (tied) head's weight trains: no gradient from here
    model, _ = load(str(tiny_model_template))
    nn.quantize(model, group_size=32, bits=4)
    assert cpu_head.output_weight(model) is None
