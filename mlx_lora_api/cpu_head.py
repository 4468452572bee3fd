"""The output layer's cross-entropy, its softmax taken by numpy, for training on the CPU.

For a small model the output layer dominates a LoRA step: SmolLM2-135M's tied 49,152-word
vocabulary gives 11 M logits for a batch of 4 x 56 tokens, and their log-sum-exp and softmax
(forward and backward) cost more than the matmuls around them, because MLX's CPU `exp` is
scalar. Here the logits are computed by MLX (the same BLAS as the rest of the step) only for
the positions the loss counts (no padding, no masked prompt), taken into numpy without a copy
for the log-sum-exp and softmax with its vectorized `exp`, and the softmax kept for the
backward pass, which is one more matmul. Measured: a cached training step 611 -> 434 ms
(docs/benchmarks.md).

numpy needs the logits' values in the middle of the step, so the step must not be compiled
(`cpu_parallel.parallel_training(eager=True)`; an eager step measured as fast on the CPU). The
head applies where the model's logits are exactly `model.model(x) @ weight.T` with a frozen
float32 weight (`output_weight`); elsewhere the loss stays MLX's.
"""

from __future__ import annotations

import functools

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")  # logits = output layer(model.model(x)), no scaling


def output_weight(model):
    """The (vocab, hidden) weight of `model`'s output layer where this head computes its
    logits exactly, else None."""
    import mlx.core as mx
    import mlx.nn as nn

    inner = getattr(model, "model", None)
    if getattr(model, "model_type", None) not in SUPPORTED or inner is None:
        return None
    if getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        layer, kind = getattr(inner, "embed_tokens", None), nn.Embedding
    else:
        layer, kind = model.lm_head, nn.Linear
    if type(layer) is not kind or "bias" in layer or layer.weight.dtype != mx.float32:
        return None  # quantized, wrapped by LoRA, with a bias, or not float32
    if "weight" in layer.trainable_parameters():
        return None  # a full fine-tune trains it: this head gives no gradient for the weight
    return layer.weight


def cross_entropy(hidden, weight, targets, mask):
    """Cross-entropy per position of logits `hidden @ weight.T` against `targets`: hidden
    (N, D) float32, weight (V, D), targets (N,) token ids, mask (N,) which positions count.
    Positions outside the mask get 0 and no gradient; only `hidden` gets a gradient.
    Evaluates its inputs (not compilable)."""
    import mlx.core as mx
    import numpy as np

    counted = np.flatnonzero(np.asarray(mask))
    if counted.size == 0:
        return mx.zeros(mask.shape, mx.float32) + 0 * hidden.sum(axis=1)  # keeps the graph to hidden
    rows = mx.array(counted)
    wanted = np.asarray(targets)[counted]
    saved = {}

    @mx.custom_function
    def head(hidden):
        logits = hidden[rows] @ weight.T
        mx.eval(logits)
        logits = np.asarray(logits)
        picked = logits[np.arange(counted.size), wanted]
        top = logits.max(axis=1, keepdims=True)
        probs = np.subtract(logits, top)
        np.exp(probs, out=probs)
        total = probs.sum(axis=1, keepdims=True)
        ce = np.zeros(mask.shape[0], np.float32)
        ce[counted] = (np.log(total) + top)[:, 0] - picked
        probs /= total
        saved["probs"] = probs
        return mx.array(ce)

    @head.vjp
    def _(hidden, cotangent, output):  # one primal: passed, and its gradient returned, as is
        probs = saved.pop("probs")
        probs[np.arange(counted.size), wanted] -= 1.0  # d ce / d logits = softmax - one-hot
        probs *= np.asarray(cotangent)[counted][:, None]
        grad = mx.zeros(hidden.shape, hidden.dtype)
        grad[rows] = mx.array(probs) @ weight
        return grad

    return head(hidden)
