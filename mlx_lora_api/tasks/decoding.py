"""A decoding step of few MLX operations for llama-architecture models (Llama 2 and 3, Mistral, SmolLM2),
on the CPU: what tasks/generate.py's batches call in place of the model.

On the CPU, every MLX operation costs 5-10 us to dispatch whatever its size, and a decoding step
works on vectors of a few hundred values: the dispatching, not the arithmetic, is half of a
token's time (docs/benchmarks.md#decoding). MLX runs `mx.fast.rope` and `mx.fast.rms_norm` there
as their fallbacks, 15 and 5 operations each, so a token of SmolLM2-135M through mlx-lm's model is
4,067 graph nodes. This step makes the same computation in 1,338:
- the rotation's angles once per token for every layer (mlx-lm computes them twice per layer),
  with the fallback's own operations, so that the cosines and sines are the same;
- queries, keys and values in one product, gate and up in one: the weights laid side by side once
  (`Fused`), the layers' own weights then views into them, so nothing is held twice; rows kept 2-D
  and the weights transposed once, so that no product reshapes or transposes;
- what lies between two attention lookups compiled (`mx.compile` fuses element-wise operations);
  the cache and the mask are mlx-lm's, called as its model calls them, so a batch's padding is
  what it would be;
- attention as MLX computes it on the CPU, its softmax compiled where a layer has enough scores
  (`_attention`): MLX's own softmax runs a scalar `exp` on x86 Linux, the compiled one goes through
  the JIT (accel/jit.py); the same bits, 2.5x faster over a long prompt's scores;
- where the model is stored in float16 or bfloat16 (computed in float32 on the CPU), each weight's
  exact copy in that type, which the products of 1 to 8 rows read instead (accel/gemv.c): half
  the bytes a token reads, the same values (`levers.half_weights`).

A LoRA adapter laid over the base (`ModelCache.get` lays it in place) adds its own products to the
fused ones, each as mlx-lm's `LoRALinear` computes it: the logits are the model's own, bit for bit
(tests/test_generation.py). Adapters side by side (tasks/mixing.py, a batch's usual case) add each
row's own, one product pair for each group of fused projections: the same tokens, the logits within
float rounding. A step of more than one token a row (a prompt) is the model's own, with `_attention`
in its module's place while it builds the step (the same bits); so is everything
with a DoRA adapter or one that adapts the embedding, on another device (where these are kernels),
and with `MLX_LORA_API_LEVERS=off`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.rope_utils import Llama3RoPE
from mlx_lm.tuner.lora import LoRALinear

from .. import device
from ..tuner import levers
from .mixing import MixedLoRALinear, Mixture

ARCHITECTURES = ("mlx_lm.models.llama",)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _plain(linear: Any) -> bool:
    return type(linear) is nn.Linear and "bias" not in linear


def eligible(model: nn.Module) -> bool:
    """A llama-architecture model whose blocks are as mlx-lm builds them, with nothing laid over."""
    if type(model).__module__ not in ARCHITECTURES or not device.on_cpu():
        return False
    inner = model.model
    if type(inner.embed_tokens) is not nn.Embedding or type(inner.norm) is not nn.RMSNorm:
        return False
    if not model.args.tie_word_embeddings and not _plain(model.lm_head):
        return False
    for layer in inner.layers:
        attention, mlp = layer.self_attn, layer.mlp
        rope = attention.rope
        if (
            getattr(layer, "use_sliding", False)
            or type(layer.input_layernorm) is not nn.RMSNorm
            or type(layer.post_attention_layernorm) is not nn.RMSNorm
            or not all(_plain(getattr(attention, n)) for n in PROJECTIONS)
            or not all(_plain(getattr(mlp, n)) for n in MLP)
            or type(rope) not in (nn.RoPE, Llama3RoPE)
            or rope.traditional
            or rope.dims != attention.head_dim
        ):
            return False
    return True


class Fused:
    """Each block's query, key and value weights as one array, gate and up as another; the blocks'
    own linear layers then hold views into them, so the model holds no second copy. Each weight is
    kept transposed (a view), as a product takes it."""

    def __init__(self, model: nn.Module):
        self.qkv: list[mx.array] = []
        self.gate_up: list[mx.array] = []
        self.o_proj: list[mx.array] = []
        self.down_proj: list[mx.array] = []
        self._linears: list[tuple[Any, ...]] = []
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            qkv = mx.concatenate([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
            gate_up = mx.concatenate([mlp.gate_proj.weight, mlp.up_proj.weight])
            mx.eval(qkv, gate_up)
            q, k = attention.q_proj.weight.shape[0], attention.k_proj.weight.shape[0]
            hidden = mlp.gate_proj.weight.shape[0]
            attention.q_proj.weight, attention.k_proj.weight = qkv[:q], qkv[q : q + k]
            attention.v_proj.weight = qkv[q + k :]
            mlp.gate_proj.weight, mlp.up_proj.weight = gate_up[:hidden], gate_up[hidden:]
            self.qkv.append(qkv.T)
            self.gate_up.append(gate_up.T)
            self.o_proj.append(attention.o_proj.weight.T)
            self.down_proj.append(mlp.down_proj.weight.T)
            linears = (*(getattr(attention, n) for n in PROJECTIONS), *(getattr(mlp, n) for n in MLP))
            self._linears.append(tuple((linear, linear.weight) for linear in linears))
        embed = model.model.embed_tokens
        self.head = (embed.weight if model.args.tie_word_embeddings else model.lm_head.weight).T
        mx.eval(model.parameters(), self.qkv, self.gate_up, self.o_proj, self.down_proj, self.head)
        # A model stored in half precision: its products of a few rows read a copy in that type.
        stored = [w.T for w in (*self.qkv, *self.gate_up, *self.o_proj, *self.down_proj, self.head)]
        self.half = levers.half_weights(stored)

    @property
    def nbytes(self) -> int:
        """What these weights hold beyond the model's own: the half-precision copies."""
        return self.half.nbytes if self.half is not None else 0

    def adapters(self, model: nn.Module) -> list[tuple[Any, ...]] | None:
        """Each block's LoRA layers over these weights, in PROJECTIONS + MLP order (None where a
        projection is the plain layer); None if the blocks no longer hold these weights (another
        kind of adapter laid over them, or other weights loaded)."""
        if type(model.model.embed_tokens) is not nn.Embedding or (
            not model.args.tie_word_embeddings and type(model.lm_head) is not nn.Linear
        ):
            return None  # the output layer is self.head
        found = []
        for layer, linears in zip(model.model.layers, self._linears, strict=True):
            attention, mlp = layer.self_attn, layer.mlp
            now = (*(getattr(attention, n) for n in PROJECTIONS), *(getattr(mlp, n) for n in MLP))
            loras = tuple(module if type(module) in (LoRALinear, MixedLoRALinear) else None for module in now)
            bases = (module.linear if lora else module for module, lora in zip(now, loras, strict=True))
            if any(a is not b or a.weight is not w for a, (b, w) in zip(bases, linears, strict=True)):
                return None
            found.append(loras)
        return found


def fuse(model: nn.Module) -> Fused | None:
    """The fused weights of a model the step applies to (see `eligible`), else None."""
    if levers.from_environment() == levers.PLAIN or not eligible(model):
        return None
    return Fused(model)


def _plus_adapters(y, x, loras, scales, per_row, names: tuple[str, ...], widths: tuple[int, ...]):
    """`y`, the fused product of `x` by the `names` projections, plus each one's LoRA product over
    its columns (`scale * (x @ a) @ b`, as mlx-lm's LoRALinear adds it). `loras`: name -> (a, b);
    `scales`: name -> scale, both for the adapted projections only.

    Adapters side by side (tasks/mixing.py) are one product pair for all of `names`, keyed by their
    names joined with "+" (`_grouped`), their scale None: `per_row` then holds each row's mask, tiled
    once for each of 1, 2 and 3 projections, and each row's scale."""
    group = "+".join(names)
    if group in scales and scales[group] is None:
        a, b = loras[group]
        mask, scale = per_row[len(names) - 1], per_row[3]
        return y + (scale * (((x @ a) * mask) @ b)).astype(x.dtype)
    if not any(name in scales for name in names):
        return y
    deltas = [
        (scales[name] * ((x @ loras[name][0]) @ loras[name][1])).astype(x.dtype)
        if name in scales
        else mx.zeros((x.shape[0], width), x.dtype)
        for name, width in zip(names, widths, strict=True)
    ]
    return y + (deltas[0] if len(deltas) == 1 else mx.concatenate(deltas, axis=-1))


GROUPS = (PROJECTIONS[:3], PROJECTIONS[3:], MLP[:2], MLP[2:])  # the products the step makes


def _grouped(layers: list[Any]) -> tuple[mx.array, mx.array]:
    """The side-by-side adapters of projections computed as one product (tasks/mixing.py): their
    `a` matrices one after another (rows x (projections x width)), their `b` matrices as a block
    diagonal, so that one product pair gives every projection's columns at once. A projection no
    adapter adapts has zero blocks. Both kept as transposed views, as `few_rows` takes them."""
    width = next(layer.lora_a.shape[1] for layer in layers if isinstance(layer, MixedLoRALinear))
    inputs = [(layer.linear if isinstance(layer, MixedLoRALinear) else layer).weight.shape for layer in layers]
    a_rows, b_rows = [], []
    for i, layer in enumerate(layers):
        outputs = inputs[i][0]
        mixed = isinstance(layer, MixedLoRALinear)
        a_rows.append(layer.lora_a.T if mixed else mx.zeros((width, inputs[i][1])))
        block = layer.lora_b.T if mixed else mx.zeros((outputs, width))  # (outputs, width)
        b_rows.append(
            mx.concatenate(
                [mx.zeros((outputs, width * i)), block, mx.zeros((outputs, width * (len(layers) - 1 - i)))], axis=1
            )
        )
    a, b = mx.concatenate(a_rows), mx.concatenate(b_rows)
    mx.eval(a, b)
    return a.T, b.T


def _before_attention(x, norm, qkv, cos, sin, loras, per_row, *, eps, heads, kv_heads, head_dim, scales):
    """Norm, the three projections in one product (and their adapters'), the rotation of queries
    and keys together (as the fallback of `mx.fast.rope` computes it). `x` is (rows, hidden): one
    token a row."""
    rows = x.shape[0]
    normed = mx.fast.rms_norm(x, norm, eps)
    widths = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    projected = _plus_adapters(normed @ qkv, normed, loras, dict(scales), per_row, PROJECTIONS[:3], widths)
    projected = projected.reshape(rows, heads + 2 * kv_heads, head_dim)
    half = head_dim // 2
    qk = projected[:, : heads + kv_heads]
    x1, x2 = qk[..., :half], qk[..., half:]
    qk = mx.expand_dims(mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1), 2)
    return qk[:, :heads], qk[:, heads:], mx.expand_dims(projected[:, heads + kv_heads :], 2)


def _after_attention(x, attended, o_proj, norm, gate_up, down_proj, loras, per_row, *, eps, hidden, scales):
    """The attention's output projection and residual, then the MLP and its residual, each product
    with its adapter's."""
    scales = dict(scales)
    attended = attended.reshape(x.shape[0], -1)
    h = x + _plus_adapters(attended @ o_proj, attended, loras, scales, per_row, ("o_proj",), (x.shape[1],))
    normed = mx.fast.rms_norm(h, norm, eps)
    projected = _plus_adapters(normed @ gate_up, normed, loras, scales, per_row, MLP[:2], (hidden, hidden))
    gated = swiglu(projected[:, :hidden], projected[:, hidden:])
    return h + _plus_adapters(gated @ down_proj, gated, loras, scales, per_row, MLP[2:], (x.shape[1],))


# Attention's softmax compiled where a layer has at least this many scores (rows x heads x queries
# x keys), unless `levers.compiled_attention` is off.
# MLX's own softmax on x86 Linux runs a scalar `exp` (the `mlx[cpu]` wheel is built for baseline
# x86-64; docs/upstream/exp.md); the same operations compiled go through the JIT, built for this CPU
# (accel/jit.py), and give the same bits. Three more operations to dispatch: below this, a loss.
COMPILED_SOFTMAX = 2048


def _softmax(scores, mask):
    """`mx.softmax(scores, axis=-1, precise=True)` as MLX's CPU backend computes it, in operations
    that compile: the maximum, the exponentials of what lies below it and their sum (each in order),
    then each exponential times the sum's reciprocal. A boolean `mask` first sets what it hides to
    float32's lowest, as `mx.fast.scaled_dot_product_attention` does."""
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    exponentials = mx.exp(scores - mx.max(scores, axis=-1, keepdims=True))
    return exponentials * (mx.array(1.0, scores.dtype) / mx.sum(exponentials, axis=-1, keepdims=True))


_compiled_softmax = mx.compile(_softmax, shapeless=True)


def _attention(queries, keys, values, cache, scale: float, mask, sinks=None, *, compiled: bool = True):
    """mlx-lm's `scaled_dot_product_attention`, the same bits: on the CPU, MLX computes it as the
    operations below (its fallback, mlx/fast.cpp), with `_softmax` compiled where a layer's scores
    are many enough (COMPILED_SOFTMAX); anything else (a quantized cache, sinks, a mask of another
    kind, few scores, not `compiled`) through mlx-lm's."""
    rows, heads, length, width = queries.shape
    kv_length = keys.shape[-2]
    causal = isinstance(mask, str) and mask == "causal"
    masked = causal or (isinstance(mask, mx.array) and mask.dtype == mx.bool_)
    if (
        not compiled
        or hasattr(cache, "bits")
        or sinks is not None
        or (mask is not None and not masked)
        or rows * heads * length * kv_length < COMPILED_SOFTMAX
    ):
        return scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    if causal:  # as the fallback builds it
        offset = kv_length - length
        mask = mx.expand_dims(mx.arange(offset, offset + length), 1) >= mx.expand_dims(mx.arange(kv_length), 0)
    kv_heads = keys.shape[1]
    repeats = heads // kv_heads
    queries = mx.array(scale, queries.dtype) * queries
    if masked:
        mask = mx.broadcast_to(mask, (rows, heads, length, kv_length))
    if repeats > 1:
        queries = queries.reshape(rows, kv_heads, repeats, length, width)
        keys, values = mx.expand_dims(keys, 2), mx.expand_dims(values, 2)
        if masked:
            mask = mask.reshape(rows, kv_heads, repeats, length, kv_length)
    weights = _compiled_softmax(queries @ mx.swapaxes(keys, -1, -2), mask)
    return (weights @ values).reshape(rows, heads, length, -1)


@contextlib.contextmanager
def _attention_in(model: nn.Module) -> Iterator[None]:
    """The model's own step, with `_attention` in place of the `scaled_dot_product_attention` its
    module calls (as it builds the step's graph, for the duration): a prompt's softmaxes over
    every pair of its tokens, compiled (a 761-token prompt of SmolLM2, 2 Zen 4 cores: 4.3 -> 3.6 s)."""
    module: Any = sys.modules[type(model).__module__]
    original = module.scaled_dot_product_attention
    module.scaled_dot_product_attention = _attention
    try:
        yield
    finally:
        module.scaled_dot_product_attention = original


@functools.lru_cache(maxsize=64)
def _compiled(function, **static):
    """`function` with its static arguments, compiled once per process for each set of them (a
    model's shapes, an adapter's scales)."""
    return mx.compile(functools.partial(function, **static))


class Decoder:
    """Called as the model is (`decoder(inputs, cache=cache)`): a step of one token a row through
    the compiled path, anything else through the model itself. Made for one batch: the adapter
    laid over the model stays as it is while the batch runs (tasks/generate.py)."""

    def __init__(self, model: nn.Module, fused: Fused, adapters: list[tuple[Any, ...]], mixture: Mixture | None):
        self.model = model
        self.fused = fused
        self.mixture = mixture  # adapters side by side: each row's, set before each call
        inner = model.model
        first = inner.layers[0]
        attention = first.self_attn
        rope = attention.rope
        half = attention.head_dim // 2
        if type(rope) is Llama3RoPE:  # Llama 3's scaled frequencies, given to mx.fast.rope as `freqs`
            self._scale = 1.0
            self._inv_freqs = mx.reciprocal(rope._freqs.astype(mx.float32))
        else:  # mx.fast.rope's fallback: exp(-i * log(base) / half), all in float32 (mlx/fast.cpp)
            self._scale = rope.scale
            step = np.log(np.float32(rope.base)) / np.float32(half)
            self._inv_freqs = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * mx.array(step, mx.float32))
        # For each block: its two compiled halves, and its adapters' (a, b) by projection (or group).
        self._blocks: list[tuple[Any, Any, dict[str, tuple[mx.array, mx.array]]]] = []
        for block, loras in zip(inner.layers, adapters, strict=True):
            adapted = [(name, lora) for name, lora in zip(PROJECTIONS + MLP, loras, strict=True) if lora is not None]
            if mixture is None:
                scales = tuple((name, float(lora.scale)) for name, lora in adapted)
                weights = {name: (lora.lora_a, lora.lora_b) for name, lora in adapted}
            else:  # adapters side by side: one product pair for each of GROUPS
                modules = {n: getattr(block.self_attn, n) for n in PROJECTIONS} | {
                    n: getattr(block.mlp, n) for n in MLP
                }
                groups = ["+".join(names) for names in GROUPS if any(n in dict(adapted) for n in names)]
                scales = tuple((group, None) for group in groups)
                weights = {group: _grouped([modules[n] for n in group.split("+")]) for group in groups}
            before = _compiled(
                _before_attention,
                eps=first.input_layernorm.eps,
                heads=attention.n_heads,
                kv_heads=attention.n_kv_heads,
                head_dim=attention.head_dim,
                scales=tuple(item for item in scales if item[0].split("+")[0] in PROJECTIONS[:3]),
            )
            after = _compiled(
                _after_attention,
                eps=first.post_attention_layernorm.eps,
                hidden=fused.gate_up[0].shape[1] // 2,
                scales=tuple(item for item in scales if item[0].split("+")[0] not in PROJECTIONS[:3]),
            )
            self._blocks.append((before, after, weights))
        self._final_norm = _compiled(mx.fast.rms_norm, eps=inner.norm.eps)
        self._compiled_attention = levers.from_environment().compiled_attention

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        return self.model.make_cache()

    def _angles(self, offset) -> tuple[mx.array, mx.array]:
        """The rotation's cosines and sines at each row's position: (rows or 1, 1, head_dim / 2)."""
        if not isinstance(offset, mx.array):
            offset = mx.array([offset], dtype=mx.int32)
        positions = offset.reshape(-1, 1).astype(mx.float32) * mx.array(self._scale, mx.float32)
        theta = positions[..., None] * self._inv_freqs
        return mx.cos(theta), mx.sin(theta)

    def __call__(self, inputs: mx.array, cache=None, **kwargs):
        if inputs.shape[1] != 1 or cache is None or kwargs.get("input_embeddings") is not None:
            if not self._compiled_attention:
                return self.model(inputs, cache=cache, **kwargs)
            with _attention_in(self.model):
                return self.model(inputs, cache=cache, **kwargs)
        inner, fused = self.model.model, self.fused
        h = inner.embed_tokens(inputs)
        mask = create_attention_mask(h, cache[inner.fa_idx])
        rows, _, width = h.shape
        h = h.reshape(rows, width)
        cos, sin = self._angles(cache[0].offset)
        per_row: tuple = ()
        if self.mixture is not None and self.mixture.width:
            each = self.mixture.mask
            per_row = (each, mx.concatenate([each] * 2, axis=1), mx.concatenate([each] * 3, axis=1), self.mixture.scale)
        for i, (layer, layer_cache, (before, after, loras)) in enumerate(zip(inner.layers, cache, self._blocks)):
            queries, keys, values = before(h, layer.input_layernorm.weight, fused.qkv[i], cos, sin, loras, per_row)
            keys, values = layer_cache.update_and_fetch(keys, values)
            scale, compiled = layer.self_attn.scale, self._compiled_attention
            attended = _attention(queries, keys, values, layer_cache, scale, mask, compiled=compiled)
            norm = layer.post_attention_layernorm.weight
            h = after(h, attended, fused.o_proj[i], norm, fused.gate_up[i], fused.down_proj[i], loras, per_row)
        return (self._final_norm(h, inner.norm.weight) @ fused.head).reshape(rows, 1, -1)


def decoder(model: nn.Module, fused: Fused | None, mixture: Mixture | None = None):
    """What a batch should call: the compiled step where `fused` still holds the model's blocks'
    weights (a LoRA adapter laid over them, or the adapters of `mixture` beside each other,
    included), else the model itself."""
    adapters = fused.adapters(model) if fused is not None else None
    if fused is None or adapters is None:
        return model
    return Decoder(model, fused, adapters, mixture)
