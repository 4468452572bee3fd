"""The optimized BLAS for MLX's CPU backend, and how freed memory is kept.

The `mlx[cpu]` wheel links the reference BLAS: a float32 matmul runs at about 5 GFLOP/s
against about 180 GFLOP/s once an optimized BLAS is loaded with RTLD_GLOBAL before
`mlx.core` is first imported, because MLX's `cblas_*` symbols then bind to it. So every
process that computes calls `prepare()` before it imports MLX.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from . import native

if TYPE_CHECKING:
    import numpy as np

    from .gemv import Shadows

log = logging.getLogger("mlx_lora_api")

BLAS_ENV = "MLX_LORA_API_BLAS"
# Debian/Ubuntu's pthread OpenBLAS first (apt-get install libopenblas0-pthread).
BLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
]
BLAS_HINT = (
    "install an optimized BLAS (Debian/Ubuntu: `apt-get install libopenblas0-pthread`) "
    f"or point {BLAS_ENV} at a libopenblas.so"
)


_state: dict[str, str | None] = {}
_shim: list[ctypes.CDLL] = []


def find_blas() -> str | None:
    if path := os.environ.get(BLAS_ENV):
        return path if path != "none" else None
    for candidate in BLAS_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return ctypes.util.find_library("openblas")


def prepare(decoding: bool = False) -> str | None:
    """Load an optimized BLAS for MLX's CPU backend; returns its path, or None. `decoding`: this
    process decodes batches of chats (gemv.load).

    Safe to call many times; a no-op on macOS, where MLX uses Accelerate and Metal.
    """
    if "blas" in _state:
        return _state["blas"]
    _state["blas"] = None
    if sys.platform == "darwin":
        return None
    from . import jit

    jit.prepare()  # only its first compiled kernel needs it, but no later than MLX's
    if "mlx.core" in sys.modules:
        log.warning("mlx.core was imported before the BLAS fast path; CPU matmuls stay slow")
        return None
    path = find_blas()
    if path is None:
        log.warning("No optimized BLAS found: CPU training runs about 30x slower; %s", BLAS_HINT)
        return None
    if not decoding and native.lever_on():
        # OpenBLAS's idle threads spin for 2^28 cycles (about 0.1 s) after each product before
        # they sleep, taking a core from the OpenMP kernels that run next (bf16/, elementwise.c):
        # a bfloat16 product took 10 ms or 19 ms by chance (1024 x 576 x 3072, 2 Zen 4 cores), and
        # the per-CPU timings that choose it were as random. 2^16 cycles (tens of microseconds)
        # still spans the gaps inside one of MLX's batched matmuls.
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")  # read when OpenBLAS loads, below
    try:
        library = ctypes.CDLL(path)  # privately first: the shim goes ahead of it (gemv.py)
    except OSError as e:
        log.warning("Could not load the BLAS at %s (%s); %s", path, e, BLAS_HINT)
        return None
    _state["gemv"] = _load_shim(library, decoding)
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # now for MLX's every other cblas_* and LAPACK symbol
    _state["blas"] = path
    try:
        library.openblas_get_corename.restype = ctypes.c_char_p
        _state["blas_kernels"] = library.openblas_get_corename().decode()
    except (AttributeError, UnicodeDecodeError):
        pass  # not OpenBLAS; with it, which kernels it chose (or OPENBLAS_CORETYPE asked for)
    return path


def _load_shim(library: ctypes.CDLL, decoding: bool) -> str | None:
    """The matrix-vector shim (gemv.py) ahead of the BLAS, unless the levers are off; says why not."""
    from . import gemv

    if not native.lever_on():
        return None
    try:
        _shim.append(gemv.load(library, decoding))
    except (OSError, AttributeError) as e:
        log.warning("%s; %s", e, gemv.WITHOUT)
        return None
    return "sgemv"


def vector_products() -> int | None:
    """How many one-row products went to the BLAS's sgemv in this process (None: no shim)."""
    return _shim[0].mlx_lora_api_gemv_count() if _shim else None


def shim() -> ctypes.CDLL | None:
    """The matrix-vector shim this process loaded ahead of the BLAS (gemv.py), or None."""
    return _shim[0] if _shim else None


def shadow_products() -> int | None:
    """How many products read a weight's half-precision copy (gemv.py's `Shadows`; None: no shim)."""
    return _shim[0].mlx_lora_api_shadow_count() if _shim else None


def half_shadows(weights: Iterable[np.ndarray]) -> Shadows | None:
    """Exact half-precision copies of these float32 weights for the shim's few-rows products
    (gemv.py), or None where the shim is not loaded."""
    from . import gemv

    return gemv.Shadows(_shim[0], weights) if _shim else None


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel.

    glibc serves every block over 128 KiB-32 MiB with a fresh mmap and unmaps it when freed, so
    each of a training step's activations (hundreds of KiB to tens of MiB on the CPU backend)
    is faulted in page by page again at every step. Kept, an element-wise op over 11 M floats
    runs 5x faster on this class of machine (docs/benchmarks.md). The process's memory then stays at its
    peak until it exits, so this is for the short-lived processes that train, not the server
    or the generation process with its memory budget. Returns whether it applied (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def warn_if_slow() -> None:
    """Say once, at server start and without importing MLX, when CPU training will be slow."""
    if sys.platform.startswith("linux") and find_blas() is None:
        log.warning("No optimized BLAS found: CPU training will run about 30x slower; %s", BLAS_HINT)


def describe() -> dict[str, str | None]:
    """The BLAS this process loaded, which of its kernels (OpenBLAS names them), and whether
    one-row products go to its sgemv ("sgemv") or its sgemm (None)."""
    return {"blas": _state.get("blas"), "blas_kernels": _state.get("blas_kernels"), "gemv": _state.get("gemv")}
