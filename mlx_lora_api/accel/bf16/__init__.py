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

Which pays differs by matmul shape and CPU: `timings.Timings` times each of a model's product
shapes once per CPU model, float32 against each gemm, and keeps the figures; `convert` then
puts the fastest in place, layer group by layer group (matmul.py), and leaves float32 where
no gemm is at least `MIN_GAIN` faster.
"""

from .gemms import ENGINES, cpu_has_bf16, engines, unavailable
from .matmul import FLOAT32, GROUPS, Group, Products, Weight, bits, convert, engine, linear
from .timings import MIN_GAIN, Timings, default_path

__all__ = [
    "ENGINES",
    "FLOAT32",
    "GROUPS",
    "MIN_GAIN",
    "Group",
    "Products",
    "Timings",
    "Weight",
    "bits",
    "convert",
    "cpu_has_bf16",
    "default_path",
    "engine",
    "engines",
    "linear",
    "unavailable",
]
