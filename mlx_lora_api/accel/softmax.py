"""Softmax over rows on every core (softmax.c), for attention and the output layer's
cross-entropy in training on the CPU (kernels.py): built at set-up (accel/prebuild.py); where it
is not, numpy does the same, single-threaded."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from . import native

SOURCE = Path(__file__).with_name("softmax.c")
# no trapping math: the clamp in exp then vectorizes (a select, not a branch); errno is never read
FLAGS = ("-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-shared", "-fPIC")
WITHOUT = "numpy takes training's softmaxes on one core"
_lib: list[ctypes.CDLL | None] = []


def target() -> Path:
    return native.target("softmax", (SOURCE,), FLAGS)


def build() -> Path:
    return native.build("softmax", (SOURCE,), FLAGS)


def library() -> ctypes.CDLL | None:
    """The built library, or None where it is not built (looked for once a process)."""
    if not _lib:
        path = target()
        if path.exists():
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as for the other kernels (bf16/gemms.py)
            lib = ctypes.CDLL(str(path))
            lib.mlx_lora_api_softmax.restype = None
            _lib.append(lib)
        else:
            _lib.append(None)
    return _lib[0]


def softmax(x: np.ndarray, length: int = 0, lse: bool = False) -> np.ndarray | None:
    """x (a C-contiguous float32 array, its last axis the row) becomes its softmax in place; with
    `length`, attention's causal mask for a window of the last `length` positions (the axis
    before the last), masked values 0. Returns each row's log-sum-exp where `lse`. Where the
    library is not built, numpy computes the same."""
    cols = x.shape[-1]
    rows = x.size // cols if cols else 0
    lib = library()
    if lib is None or not x.flags.c_contiguous or x.dtype != np.float32:
        return _numpy(x, length, lse)
    out = np.empty(x.shape[:-1], np.float32) if lse else None
    lib.mlx_lora_api_softmax(
        ctypes.c_void_p(x.ctypes.data),
        ctypes.c_long(rows),
        ctypes.c_long(cols),
        ctypes.c_long(length),
        ctypes.c_void_p(out.ctypes.data) if out is not None else None,
    )
    return out


def _numpy(x: np.ndarray, length: int, lse: bool) -> np.ndarray | None:
    if length:
        cols = x.shape[-1]
        visible = np.arange(cols)[None] <= (np.arange(length) + (cols - length))[:, None]
        x[...] = np.where(visible, x, -np.inf)
    top = x.max(axis=-1, keepdims=True)
    x -= top
    np.exp(x, out=x)
    total = x.sum(axis=-1, keepdims=True)
    x /= total
    return (np.log(total) + top)[..., 0] if lse else None
