#!/usr/bin/env python3
"""The matmuls a training step is made of, float32 (MLX + OpenBLAS) against the bfloat16 gemms
`cpu_bfloat16` can use (the service's AVX-512 BF16 kernel, oneMKL's `cblas_gemm_bf16bf16f32`), in
GFLOP/s, at SmolLM2-135M's shapes (q, k and v together, as training groups them) for a chat batch
(4 x 56 tokens) and a long one (4 x 512), each call as training makes it (the input's rounding to
bfloat16, the threads' wake-up, the result copied into an MLX array). Shows on the spot which
matmuls `cpu_bfloat16` puts in bfloat16 on this CPU (accel/bf16/timings.py decides the same way,
from figures it keeps per CPU model), and with which gemm.

    .venv/bin/python scripts/bench_gemm.py [--repeats 9] [--rows 224,2048]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = [  # (name, N, K, transpose): (M, K) @ W.T with W (N, K), or @ W with W (K, N)
    ("q, k, v projections", 960, 576, True),
    ("o projection", 576, 576, True),
    ("gate, up projections", 3072, 576, True),
    ("down projection", 576, 1536, True),
    ("output layer's logits", 49152, 576, True),
    ("output layer's gradient", 576, 49152, False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rows", default="224,2048", help="the rows of a step's products (batch x tokens)")
    args = parser.parse_args()

    from mlx_lora_api.accel import blas as backend

    blas = backend.prepare()
    backend.keep_freed_memory()  # as the training process does (jobs/process.py)
    import mlx.core as mx

    from mlx_lora_api.accel import bf16
    from scripts.bench_train import machine

    reason = bf16.unavailable()
    runnable = [name for name, why in bf16.engines().items() if why is None] if not reason else []
    kernels = backend.describe()["blas_kernels"]
    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"float32: MLX {mx.__version__} with {blas or 'its own BLAS'} ({kernels or 'kernels unknown'}; "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')})"
    )
    for name, why in bf16.engines().items() if not reason else []:
        print(f"bfloat16, {bf16.ENGINES[name]}: {why or 'runs here'}")
    if reason:
        print(f"bfloat16: {reason}")
        return
    measure = lambda m, n, k, t: bf16.timings.measure_product(m, n, k, t, args.repeats)
    fresh = bf16.Timings(None, measure)
    kept = bf16.Timings(bf16.default_path())
    print(f"kept for this CPU: {kept.path} ({'present' if kept.path and kept.path.exists() else 'not yet'})")
    print()
    print(
        "| matmul | M x N x K | float32 GFLOP/s | "
        + " | ".join(f"{n} bf16 GFLOP/s" for n in runnable)
        + " | chosen | chosen from the kept figures |"
    )
    print("|---|---|---|" + "---|" * len(runnable) + "---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        for name, n, k, transpose in SHAPES:
            m = bf16.timings.bucket(rows, n, k)
            seconds = fresh.seconds(m, n, k, transpose)
            cells = [f"{2 * m * n * k / seconds[e] / 1e9:.0f}" for e in ["float32", *runnable]]
            chosen = fresh.choose([(n, k, transpose)], Counter({m: 1}))[0]
            kept_choice = kept.choose([(n, k, transpose)], Counter({rows: 1}))[0] if kept.path else "-"
            print(f"| {name} | {m} x {n} x {k} | " + " | ".join(cells) + f" | {chosen} | {kept_choice} |")


if __name__ == "__main__":
    main()
