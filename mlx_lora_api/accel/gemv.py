"""Vector-by-matrix products through the BLAS's sgemv (gemv.c): about 1.8x the tokens/s when
decoding on the CPU (docs/benchmarks.md). Built at set-up (accel/prebuild.py), loaded by
blas.prepare() ahead of the BLAS; MLX_LORA_API_LEVERS=off leaves it out."""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import native

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
WITHOUT = "decoding on the CPU runs about half as fast"


def target() -> Path:
    return native.target("gemv", (SOURCE,), FLAGS)


def build() -> Path:
    return native.build("gemv", (SOURCE,), FLAGS)


def load(blas: ctypes.CDLL, decoding: bool = False) -> ctypes.CDLL:
    """The shim, in the global namespace ahead of `blas` (loaded RTLD_LOCAL so far), forwarding
    to its sgemm and sgemv. Raises OSError where it is not built. `decoding`: for the generation
    process, whose OpenMP threads spin a little between products (below)."""
    path = target()
    if not path.exists():
        raise OSError(f"the matrix-vector shim is not built for this compiler ({path.name}): run ./scripts/setup")
    # OpenMP's idle threads would otherwise spin after each product, taking the core that MLX's
    # single-threaded ops and OpenBLAS need next (as for the bf16 kernel: bf16/gemms.py). A batch
    # of chats decoding runs a few-rows product every few tens of microseconds, where waking a
    # sleeping thread costs more than its share of one: there the threads spin for about 100,000
    # rounds (a tenth of a millisecond) before they sleep (8 chats of SmolLM2 in process on 2 Zen 4
    # cores: 78-102 -> 114-120 tokens/s; idle, 3 ms of spinning, then nothing).
    if decoding:
        os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
        os.environ.setdefault("GOMP_SPINCOUNT", "100000")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when libgomp loads, just below
    shim = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    address = ctypes.c_void_p
    shim.mlx_lora_api_gemv_use(ctypes.cast(blas.cblas_sgemm, address), ctypes.cast(blas.cblas_sgemv, address))
    shim.mlx_lora_api_gemv_count.restype = ctypes.c_long
    shim.mlx_lora_api_few_rows_count.restype = ctypes.c_long
    shim.mlx_lora_api_shadow_count.restype = ctypes.c_long
    shim.mlx_lora_api_shadow_add.argtypes = [address, address, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    shim.mlx_lora_api_shadow_remove.argtypes = [address]
    shim.mlx_lora_api_routed_count.restype = ctypes.c_long
    # weight, rows, cols, packed, kp, np, bf16_matmul
    shim.mlx_lora_api_route_add.argtypes = [
        address,
        ctypes.c_long,
        ctypes.c_long,
        address,
        ctypes.c_int,
        ctypes.c_int,
        address,
    ]
    shim.mlx_lora_api_route_remove.argtypes = [address]
    return shim


FLOAT16, BFLOAT16 = 1, 2  # gemv.c's kinds


def half_copy(weight: np.ndarray) -> tuple[int, np.ndarray] | None:
    """`weight` (float32) stored as float16 or bfloat16 (as 16-bit words), where every value is
    exactly one of that type (a model stored in it, computed in float32); None where not."""
    half = weight.astype(np.float16)
    if np.array_equal(half.astype(np.float32), weight):
        return FLOAT16, half.view(np.uint16)
    bits = weight.view(np.uint32)
    if not np.any(bits & 0xFFFF):
        return BFLOAT16, (bits >> 16).astype(np.uint16)
    return None


class Shadows:
    """Exact half-precision copies of float32 weights, which the shim reads in their place for
    products of 1 to 8 rows (gemv.c): what decoding a token reads from memory, halved. Each weight
    is a row-major float32 array over the very buffer MLX multiplies (a view, not a copy); a weight
    that is not exactly representable gets none. Kept until this object goes: the shim forgets them
    first (waiting for a product that reads one), then the copies and weights are let go."""

    def __init__(self, shim: ctypes.CDLL, weights: Iterable[np.ndarray]):
        kept: list[tuple[np.ndarray, np.ndarray]] = []
        kinds = set()
        for weight in weights:
            if weight.dtype != np.float32 or weight.ndim != 2 or not weight.flags.c_contiguous:
                continue
            copy = half_copy(weight)
            if copy is None:
                continue
            kind, half = copy
            rows, cols = weight.shape
            if shim.mlx_lora_api_shadow_add(weight.ctypes.data, half.ctypes.data, rows, cols, kind):
                kept.append((weight, half))
                kinds.add("float16" if kind == FLOAT16 else "bfloat16")
        self.count = len(kept)
        self.nbytes = sum(half.nbytes for _, half in kept)
        self.kinds = sorted(kinds)
        weakref.finalize(self, _forget, shim, kept)


def _forget(shim: ctypes.CDLL, kept: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for weight, _ in kept:
        shim.mlx_lora_api_shadow_remove(weight.ctypes.data)
