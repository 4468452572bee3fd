"""The CPU fast path: the optimized BLAS loaded before MLX (blas.py), numpy kernels for what
MLX's CPU backend computes slowly (kernels.py), MLX's CPU streams over the cores (streams.py),
and bfloat16 matmuls (bf16/). Imported by tuner/levers.py alone (and blas.py by the processes
that start MLX); on Metal and CUDA none of it but blas.py is loaded."""
