"""Attention, SwiGLU and the output layer's cross-entropy with numpy's exp, for training on the CPU.

On x86, MLX's CPU `exp` (and so `sigmoid`, `softmax`, `logsumexp`) is scalar, about 12 ns a
float against under 1 ns for numpy's vectorized one, and it weighs on every LoRA step: the
softmax over SmolLM2's 49,152-word vocabulary (11 M logits for 4 x 56 tokens), attention's
softmax (the larger part at 512 tokens) and SwiGLU's sigmoid. Each function here lets MLX do
the matmuls and hands the transcendental part to numpy, without a copy on the way in, and
carries its exact derivative as a custom VJP. Measured on SmolLM2-135M (docs/benchmarks.md):
a cached step of 4 x 56 tokens 611 -> 421 ms, the frozen blocks' forward pass 408 -> 272 ms;
at 4 x 488 tokens 5.2 -> 3.8 s and 5.6 -> 2.8 s.

The softmaxes themselves (attention's, the output layer's) and SwiGLU go to elementwise.c where it
is built: fused passes on every core, instead of numpy's five on one (at 4 x 512 tokens a layer's
attention softmax 35 -> 3 ms, the output layer's 160 -> 60 ms, on 2 Zen 4 cores).

numpy needs the values in the middle of the step, so the step must not be compiled:
`streams.parallel_training(eager=True)` (an eager step measured as fast on the CPU).
Only `hidden` (and attention's and SwiGLU's inputs) get gradients: the output layer's weight must be
frozen (tuner/anatomy.py's `output_weight` checks it).
"""

from __future__ import annotations

from typing import cast

import mlx.core as mx
import numpy as np

from . import elementwise
from .bf16 import Weight


def swiglu(gate, x):
    """silu(gate) * x, as mlx-lm's `swiglu`."""
    saved = {}

    @mx.custom_function
    def fn(gate, x):
        mx.eval(gate, x)
        out, saved["sigmoid"] = elementwise.swiglu(np.asarray(gate), np.asarray(x))
        return mx.array(out)

    @fn.vjp
    def _(primals, cotangent, output):
        gate, x = primals
        s = mx.array(saved.pop("sigmoid"))
        silu = gate * s
        return cotangent * x * (s + silu * (1.0 - s)), cotangent * silu

    return fn(gate, x)


def attention(queries, keys, values, scale: float, causal: bool):
    """Scaled dot-product attention as `mx.fast.scaled_dot_product_attention` computes it with
    no mask or the "causal" one (grouped-query heads too), its softmax taken by numpy. Its VJP
    is written out so that only the attention probabilities are kept for the backward pass
    (MLX's graph would keep the scores and the masked scores too: three arrays of B x H x T^2)."""
    batch, heads, length, dim = queries.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    saved = {}

    def grouped(q):  # (B, H, T, D) -> (B, KV heads, group, T, D), scaled
        return (q * scale).reshape(batch, kv_heads, group, length, dim)

    @mx.custom_function
    def fn(queries, keys, values):
        scores = grouped(queries) @ keys[:, :, None].swapaxes(-1, -2)  # (B, KV, group, T, S)
        mx.eval(scores)
        probs = np.asarray(scores)
        if probs.flags.c_contiguous and probs.flags.writeable:
            # in place: the product's own fresh buffer, read by nothing else; it then holds the
            # probabilities, kept for the backward pass without a copy
            elementwise.softmax(probs, length if causal else 0)
            kept = scores
        else:
            probs = np.ascontiguousarray(probs, np.float32).copy()
            elementwise.softmax(probs, length if causal else 0)
            kept = mx.array(probs)
        saved["probs"] = kept
        return (kept @ values[:, :, None]).reshape(batch, heads, length, dim)

    @fn.vjp
    def _(primals, cotangent, output):
        queries, keys, values = primals
        probs = saved.pop("probs")
        d_out = cotangent.reshape(batch, kv_heads, group, length, dim)
        d_values = (probs.swapaxes(-1, -2) @ d_out).sum(axis=2)
        d_probs = d_out @ values[:, :, None].swapaxes(-1, -2)
        d_scores = probs * (d_probs - (d_probs * probs).sum(axis=-1, keepdims=True))
        d_queries = (d_scores @ keys[:, :, None]) * scale
        d_keys = (d_scores.swapaxes(-1, -2) @ grouped(queries)).sum(axis=2)
        return d_queries.reshape(batch, heads, length, dim), d_keys, d_values

    return fn(queries, keys, values)


# Rows of logits computed at a time: 256 x 49,152 float32 (50 MB) for SmolLM2's vocabulary, where
# the whole batch's (4 x 512 tokens) took 400 MB, and again for their gradient.
CHUNK = 256


def cross_entropy(
    hidden: mx.array, weight: mx.array | Weight, targets: mx.array, mask: mx.array, gradient: bool = True
) -> mx.array:
    """Cross-entropy per position of logits `hidden @ weight.T` against `targets`: hidden
    (N, D) float32, weight (V, D) float32 or a `bf16.Weight` (its matmuls in bfloat16), targets
    (N,) token ids, mask (N,) which positions count.
    Positions outside the mask get 0 and no gradient; only `hidden` gets a gradient.

    The logits are made CHUNK rows at a time, and never kept: each chunk's softmax, less the
    one-hot target, is multiplied by the weight at once into the rows' gradient (N, D), which
    the backward pass only scales by its cotangent. Without `gradient` (evaluation: nothing will
    ask for it) that second product is skipped. Evaluates its inputs (not compilable)."""
    counted = np.flatnonzero(np.asarray(mask))
    if counted.size == 0:
        return mx.zeros(mask.shape, mx.float32) + 0 * hidden.sum(axis=1)  # keeps the graph to hidden
    rows = mx.array(counted)
    wanted = np.asarray(targets)[counted]
    saved = {}

    @mx.custom_function
    def head(hidden):
        picked_rows = hidden[rows]
        mx.eval(picked_rows)
        inputs = np.asarray(picked_rows)
        ce = np.zeros(mask.shape[0], np.float32)
        grad = np.empty(inputs.shape, np.float32) if gradient else None
        for begin in range(0, counted.size, CHUNK):
            part = slice(begin, min(begin + CHUNK, counted.size))
            logits, same = _logits(weight, picked_rows[part], inputs[part])  # (rows, V), this chunk's own
            taken = (np.arange(logits.shape[0]), wanted[part])
            picked = logits[taken]  # a copy, taken before the softmax below
            lse = elementwise.softmax(logits, lse=True)  # in place: the logits become the probabilities
            assert lse is not None
            ce[counted[part]] = lse - picked
            if grad is not None:
                logits[taken] -= 1.0  # d ce / d logits = softmax - one-hot
                grad[part] = _times_weight(weight, same)
        saved["grad"] = grad
        return mx.array(ce)

    @head.vjp
    def _(hidden, cotangent, output):  # one primal: passed, and its gradient returned, as is
        if saved.get("grad") is None:
            raise RuntimeError("this output layer was made without its gradient (gradient=False)")
        grad = mx.zeros(hidden.shape, hidden.dtype)
        grad[rows] = mx.array(saved.pop("grad")) * cotangent[rows][:, None]
        return grad

    return cast(mx.array, head(hidden))  # mx.custom_function's stub returns object


def _logits(weight: mx.array | Weight, rows: mx.array, same_rows: np.ndarray) -> tuple[np.ndarray, object]:
    """rows @ weight.T as a C-contiguous, writable float32 array (`same_rows`: the rows in numpy),
    and that array as `_times_weight` takes it: for MLX's float32 product, MLX's own array, whose
    fresh buffer the numpy one is (changed in place by the caller, then read without a copy)."""
    if isinstance(weight, Weight):
        logits = weight.product(same_rows, transpose=True)  # a fresh array
        return logits, logits
    product = rows @ weight.T
    mx.eval(product)
    logits = np.asarray(product)
    if logits.flags.c_contiguous and logits.flags.writeable:
        return logits, product
    logits = np.ascontiguousarray(logits, np.float32).copy()
    return logits, logits


def _times_weight(weight: mx.array | Weight, a) -> np.ndarray:
    """a @ weight, a (rows, V) from `_logits`."""
    if isinstance(weight, Weight):
        return weight.product(a, transpose=False)
    product = (a if isinstance(a, mx.array) else mx.array(a)) @ weight
    mx.eval(product)
    return np.asarray(product)


class OutputLayer:
    """The output layer of frozen `weight` with its cross-entropy, as the loss takes it
    (tuner/losses.py's `Head`): computing the gradient with the loss, or (`forward_only()`,
    for evaluation) not."""

    def __init__(self, weight: mx.array | Weight, gradient: bool = True):
        self.weight, self.gradient = weight, gradient

    def __call__(self, hidden: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
        return cross_entropy(hidden, self.weight, targets, mask, self.gradient)

    def forward_only(self) -> OutputLayer:
        return OutputLayer(self.weight, gradient=False)


def head(weight: mx.array | Weight) -> OutputLayer:
    """The output layer of frozen `weight` with its cross-entropy, as the loss takes it."""
    return OutputLayer(weight)
