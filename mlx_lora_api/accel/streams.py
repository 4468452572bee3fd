"""How a training run uses the CPU: eager steps with numpy kernels, and MLX's CPU streams.

On the CPU, MLX runs an element-wise op such as `exp` on one thread and, on x86, at scalar
speed, so softmaxes and sigmoids weigh on a LoRA step. `parallel_training` puts
`kernels`' numpy-backed attention and SwiGLU in the model's place while it trains (which
needs steps that are not compiled); where MLX's own cross-entropy remains, it is split by rows
over one CPU stream per core, and streams run on different threads.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import device
from . import kernels

_streams: list[Any] = []
_active: list[bool] = []  # parallel_training's ops flag, innermost last


def cpu_streams() -> list[Any]:
    """One MLX CPU stream per core (at most 8), on the CPU backend; none elsewhere."""
    if not _streams and device.on_cpu():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        _streams.extend(mx.new_stream(mx.cpu) for _ in range(min(cores, 8)))
    return _streams


def split_rows(fn: Callable[..., mx.array], *arrays: mx.array) -> mx.array:
    """fn over row blocks of `arrays` (same leading size), one block per CPU stream,
    concatenated; inside `parallel_training(ops=True)` only."""
    streams = cpu_streams() if _active and _active[-1] else []
    rows = arrays[0].shape[0]
    if len(streams) < 2 or rows < 2:
        return fn(*arrays)
    count = min(len(streams), rows)
    parts = []
    for i in range(count):
        start, end = i * rows // count, (i + 1) * rows // count
        with mx.stream(streams[i]):
            parts.append(fn(*(a[start:end] for a in arrays)))
    return mx.concatenate(parts)


def _attention(original: Callable[..., mx.array]) -> Callable[..., mx.array]:
    def attention(queries, keys, values, cache, scale, mask, sinks=None):
        # The training case only: no KV cache, a causal or no mask (arrays would need slicing).
        causal = isinstance(mask, str) and mask == "causal"
        if cache is not None or sinks is not None or not (mask is None or causal):
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        return kernels.attention(queries, keys, values, scale, causal)

    return attention


def _swiglu(original: Callable[..., mx.array]) -> Callable[..., mx.array]:
    return kernels.swiglu


@contextlib.contextmanager
def _patched(model: nn.Module, wrappers: dict[str, Any]) -> Iterator[None]:
    """The functions `model`'s module calls by these names, wrapped, for the duration."""
    module = sys.modules.get(type(model).__module__)
    originals = {name: getattr(module, name) for name in wrappers if getattr(module, name, None) is not None}
    for name, original in originals.items():
        setattr(module, name, wrappers[name](original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(module, name, original)


@contextlib.contextmanager
def parallel_training(model: nn.Module, ops: bool = True, eager: bool = False) -> Iterator[None]:
    """While training `model` on the CPU.

    With `eager`, nothing is compiled, training steps included (`kernels` evaluate
    mid-step; an eager step measured as fast as a compiled one on the CPU), and with `ops` too
    the model's attention and SwiGLU (the names its module calls; other architectures are left
    as they are) become `kernels`'. With `ops`, MLX's cross-entropy (where the output
    layer is not `kernels`') is split by rows over the CPU streams.
    """
    wrappers = {"scaled_dot_product_attention": _attention, "swiglu": _swiglu} if ops and eager else {}
    with _patched(model, wrappers):
        _active.append(ops)
        if eager:
            mx.disable_compile()
        try:
            yield
        finally:
            if eager:
                mx.enable_compile()
            _active.pop()
