"""Which device MLX computes on here, and in which dtype. Imported only where MLX runs."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu or not mx.is_available(mx.gpu)


def cast_for_compute(model: nn.Module) -> None:
    """float32 on the CPU, where bfloat16/float16 matmuls are slow; native dtypes elsewhere.

    Quantized weights (integer arrays) are left alone by `set_dtype`, and so are those already in
    float32: the same arrays, not copies (tasks/decoding.py's fused weights are views the layers
    keep).
    """
    if on_cpu():
        model.set_dtype(mx.float32, predicate=lambda t: mx.issubdtype(t, mx.floating) and t != mx.float32)


def matmul_gflops() -> float:
    """This machine's matmul rate at a training step's shapes, in its compute type (a batch of
    4 x 128 tokens through a 576 x 1536 weight, SmolLM2-135M's MLP): the first guess at how fast
    steps run here (jobs/estimate.py), until a fine-tune has finished."""
    import time

    dtype = mx.float32 if on_cpu() else mx.float16
    x = mx.random.normal((512, 576)).astype(dtype)
    w = mx.random.normal((576, 1536)).astype(dtype)
    mx.eval(x @ w)
    rounds = 20
    started = time.perf_counter()
    for _ in range(rounds):
        mx.eval(x @ w)
    return round(2 * 512 * 576 * 1536 * rounds / (time.perf_counter() - started) / 1e9, 1)
