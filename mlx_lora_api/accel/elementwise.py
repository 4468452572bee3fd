"""Training's element-wise work with exp on every core (elementwise.c): the softmax over rows of
attention and of the output layer's cross-entropy, and SwiGLU (kernels.py). Built at set-up
(accel/prebuild.py); where it is not, numpy does the same, single-threaded."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from . import native

SOURCE = Path(__file__).with_name("elementwise.c")
# no trapping math: the clamp in exp then vectorizes (a select, not a branch); errno is never read
FLAGS = ("-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-shared", "-fPIC")
WITHOUT = "numpy takes training's softmaxes and SwiGLU on one core"
_lib: list[ctypes.CDLL | None] = []


def target() -> Path:
    return native.target("elementwise", (SOURCE,), FLAGS)


def build() -> Path:
    return native.build("elementwise", (SOURCE,), FLAGS)


def library() -> ctypes.CDLL | None:
    """The built library, or None where it is not built (looked for once a process)."""
    if not _lib:
        path = target()
        if path.exists():
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as for the other kernels (bf16/gemms.py)
            lib = ctypes.CDLL(str(path))
            lib.mlx_lora_api_softmax.restype = None
            lib.mlx_lora_api_swiglu.restype = None
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


def swiglu(gate: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(silu(gate) * x, sigmoid(gate)) of two float32 arrays of one shape, each with its last axis
    contiguous (rows may lie apart: views of one stacked projection's halves are not copied)."""
    lib = library()
    cols = gate.shape[-1] if gate.ndim else 1
    rows = gate.size // cols if cols else 0
    flat = [np.reshape(a, (rows, cols)) for a in (gate, x)] if gate.shape == x.shape and rows else []
    if lib is None or not flat or any(a.dtype != np.float32 or a.strides[1] != 4 for a in flat):
        return _numpy_swiglu(gate, x)
    (g, gate_stride), (v, x_stride) = ((a, a.strides[0] // 4) for a in flat)
    out, sigmoid = np.empty(gate.shape, np.float32), np.empty(gate.shape, np.float32)
    address = ctypes.c_void_p
    lib.mlx_lora_api_swiglu(
        address(g.ctypes.data),
        ctypes.c_long(gate_stride),
        address(v.ctypes.data),
        ctypes.c_long(x_stride),
        address(out.ctypes.data),
        address(sigmoid.ctypes.data),
        ctypes.c_long(rows),
        ctypes.c_long(cols),
    )
    return out, sigmoid


def _numpy_swiglu(gate: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.negative(gate)
    with np.errstate(over="ignore"):  # exp(-gate) = inf below -88: sigmoid is 0, as it should
        np.exp(s, out=s)
    s += 1.0
    np.reciprocal(s, out=s)  # sigmoid(gate)
    return gate * s * x, s


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
