"""Running MLX's single-threaded CPU work on every core.

On the CPU, MLX runs an element-wise op such as `exp` on one thread (and, on x86, about 17x
slower than numpy's vectorized exp), so the softmax over a 49,152-word vocabulary and the
softmax of attention dominate a LoRA step. Ops placed on different CPU streams run on
different threads: splitting those two softmaxes by rows or by batch over one stream per core
runs them in parallel, with the same results. SwiGLU's sigmoid gets the same treatment.
"""

from __future__ import annotations

import contextlib
import os
import sys

_streams: list = []


def cpu_streams() -> list:
    """One MLX CPU stream per core (at most 8), on the CPU backend; none elsewhere."""
    import mlx.core as mx

    from . import backend

    if not _streams and backend.on_cpu():
        _streams.extend(mx.new_stream(mx.cpu) for _ in range(min(os.cpu_count() or 1, 8)))
    return _streams


def split_rows(fn, *arrays):
    """fn over row blocks of `arrays` (same leading size), one block per CPU stream, concatenated."""
    import mlx.core as mx

    streams = cpu_streams()
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


def _attention(original):
    import mlx.core as mx

    def attention(queries, keys, values, cache, scale, mask, sinks=None):
        # Only the training case: no KV cache, a causal or no mask (arrays would need slicing too).
        if cache is not None or sinks is not None or not (mask is None or isinstance(mask, str)):
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        return split_rows(
            lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask), queries, keys, values
        )

    return attention


def _rows(original):
    def split(*arrays):
        return split_rows(original, *arrays)

    return split


@contextlib.contextmanager
def parallel_training(model):
    """While training `model` on the CPU, split its attention and its SwiGLU by batch over the
    CPU streams (the names its model module calls; other architectures are left as they are)."""
    module = sys.modules.get(type(model).__module__)
    originals = {name: getattr(module, name, None) for name in ("scaled_dot_product_attention", "swiglu")}
    originals = {name: fn for name, fn in originals.items() if fn is not None}
    if not originals or len(cpu_streams()) < 2:
        yield
        return
    wrappers = {"scaled_dot_product_attention": _attention, "swiglu": _rows}
    for name, original in originals.items():
        setattr(module, name, wrappers[name](original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(module, name, original)
