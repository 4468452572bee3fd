"""Vector-by-matrix products through the BLAS's sgemv (gemv.c): about 1.8x the tokens/s when
decoding on the CPU (docs/benchmarks.md). Built at set-up (accel/prebuild.py), loaded by
blas.prepare() ahead of the BLAS; MLX_LORA_API_LEVERS=off leaves it out."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

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
    return shim
