"""Which device MLX computes on here, and in which dtype. Imported only where MLX runs."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu or not mx.is_available(mx.gpu)


def cast_for_compute(model: nn.Module) -> None:
    """float32 on the CPU, where bfloat16/float16 matmuls are slow; native dtypes elsewhere.

    Quantized weights (integer arrays) are left alone by `set_dtype`.
    """
    if on_cpu():
        model.set_dtype(mx.float32)
