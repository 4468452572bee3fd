"""bfloat16 matmuls for the frozen weights on the CPU (opt-in: the `cpu_bfloat16` parameter).

On the CPU the service computes in float32 (MLX's CPU bfloat16 matmul runs at about 5
GFLOP/s). CPUs with AVX-512 BF16 or Intel AMX multiply bfloat16 faster than float32, which is
how PyTorch's bf16 autocast gets ahead. Two bfloat16 gemms (bfloat16 inputs, float32
accumulation and result) can do it here (gemms.py):

- the service's own AVX-512 BF16 kernel (gemm.c, VDPBF16PS; built by build.py when the
  project is set up): on a 2-core AMD EPYC Zen 5 about 1,000 GFLOP/s at a LoRA block's shapes,
  against 250 for OpenBLAS's AVX2 float32 sgemm and 450 for its AVX-512 one;
- oneMKL's `cblas_gemm_bf16bf16f32` (PyPI's `mkl` wheel, the project's `bf16` extra): 600-1,800
  GFLOP/s with AMX on a 2-core Sapphire Rapids, but about 210 on that AMD CPU.

`slower` times each against float32 once per process and picks the fastest; where none is at
least `MIN_GAIN` faster, training stays float32. `convert` then puts them in place (matmul.py).
"""

from .gemms import ENGINES, MIN_GAIN, cpu_has_bf16, engines, unavailable
from .matmul import GROUPS, Group, Weight, bits, convert, engine, linear, slower

__all__ = [
    "ENGINES",
    "GROUPS",
    "MIN_GAIN",
    "Group",
    "Weight",
    "bits",
    "convert",
    "cpu_has_bf16",
    "engine",
    "engines",
    "linear",
    "slower",
    "unavailable",
]
