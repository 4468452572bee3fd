"""Building the AVX-512 BF16 kernel (gemm.c), once, when the project is set up (accel/native.py).
A job never compiles: where the library for today's key is missing, `cpu_bfloat16` says so and
training stays float32."""

from __future__ import annotations

from pathlib import Path

from .. import native
from ..native import BuildError, compiler

SOURCE = Path(__file__).with_name("gemm.c")
HEADERS = (Path(__file__).with_name("round.h"),)
FLAGS = ("-O3", "-mavx512f", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC")

__all__ = ["FLAGS", "BuildError", "build", "compiler", "target"]


def target(cc: str | None = None) -> Path:
    """Where the library for this source, compiler and these flags is (or would be) cached."""
    return native.target("bf16_gemm", (SOURCE, *HEADERS), FLAGS, cc)


def build() -> Path:
    """Compile gemm.c unless today's key is built already; returns the library's path."""
    try:
        return native.build("bf16_gemm", (SOURCE, *HEADERS), FLAGS)
    except BuildError as e:
        raise BuildError(f"{e} (building the AVX-512 BF16 kernel)") from e
