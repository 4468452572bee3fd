"""How a training run uses the CPU: its cores, compiled or eager steps, vectorized kernels.

On the CPU, MLX runs an element-wise op such as `exp` on one thread (and, on x86, about 17x
slower than numpy's vectorized exp), so softmaxes and sigmoids weigh on a LoRA step. Three
answers, each measured (docs/benchmarks.md): ops placed on different CPU streams run on
different threads, so a compiled step splits the cross-entropy, attention and SwiGLU by batch
over one stream per core (`parallel_training`); the output layer's softmax goes to numpy
(`cpu_head`, which needs eager steps); and the frozen blocks' forward pass uses `cpu_ops`'
polynomial exp (`frozen_forward`).
"""

from __future__ import annotations

import contextlib
import os
import sys

_streams: list = []
_active: list[bool] = []  # parallel_training's ops flag, innermost last


def cpu_streams() -> list:
    """One MLX CPU stream per core (at most 8), on the CPU backend; none elsewhere."""
    import mlx.core as mx

    from . import backend

    if not _streams and backend.on_cpu():
        _streams.extend(mx.new_stream(mx.cpu) for _ in range(min(os.cpu_count() or 1, 8)))
    return _streams


def split_rows(fn, *arrays):
    """fn over row blocks of `arrays` (same leading size), one block per CPU stream,
    concatenated; inside `parallel_training(ops=True)` only."""
    import mlx.core as mx

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


def _split_attention(original):
    import mlx.core as mx

    def attention(queries, keys, values, cache, scale, mask, sinks=None):
        # Only the training case: no KV cache, a causal or no mask (arrays would need slicing too).
        if cache is not None or sinks is not None or not (mask is None or isinstance(mask, str)):
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        return split_rows(
            lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask), queries, keys, values
        )

    return attention


def _split_swiglu(original):
    def swiglu(*arrays):
        return split_rows(original, *arrays)

    return swiglu


def _fast_attention(original):
    from . import cpu_ops

    def attention(queries, keys, values, cache, scale, mask, sinks=None):
        causal = isinstance(mask, str) and mask == "causal"
        if cache is not None or sinks is not None or not (mask is None or causal):
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        return cpu_ops.attention(queries, keys, values, scale, causal)

    return attention


def _fast_swiglu(original):
    from . import cpu_ops

    return cpu_ops.swiglu


@contextlib.contextmanager
def _patched(model, wrappers: dict):
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


_eager: list[bool] = []  # parallel_training's eager flag, innermost last


@contextlib.contextmanager
def parallel_training(model, ops: bool = True, eager: bool = False):
    """While training `model` on the CPU.

    With `eager`, training steps are not compiled (`cpu_head` evaluates mid-step; measured as
    fast as a compiled step on the CPU). With `ops` and compiled steps, attention, SwiGLU and
    the cross-entropy are split by batch over the CPU streams (the names the model's module
    calls; other architectures are left as they are). In an eager step the split measured no
    faster (458 against 440 ms a step), so it is off there.
    """
    import mlx.core as mx

    split = ops and not eager and len(cpu_streams()) >= 2
    wrappers = {"scaled_dot_product_attention": _split_attention, "swiglu": _split_swiglu} if split else {}
    with _patched(model, wrappers):
        _active.append(split)
        _eager.append(eager)
        if eager:
            mx.disable_compile()
        try:
            yield
        finally:
            if eager:
                mx.enable_compile()
            _eager.pop()
            _active.pop()


@contextlib.contextmanager
def frozen_forward(model, fast: bool = True):
    """For a forward pass that nothing differentiates (the frozen blocks): with `fast`, on the
    CPU, `cpu_ops`' attention and SwiGLU, compiled even inside an eager `parallel_training`."""
    import mlx.core as mx

    if not fast or not cpu_streams():
        yield
        return
    eager = bool(_eager and _eager[-1])
    with _patched(model, {"scaled_dot_product_attention": _fast_attention, "swiglu": _fast_swiglu}):
        if eager:
            mx.enable_compile()
        try:
            yield
        finally:
            if eager:
                mx.disable_compile()
