#!/usr/bin/env python3
"""The matmuls a training step is made of, float32 (MLX + OpenBLAS) against the bfloat16 gemms
`cpu_bfloat16` can use (the service's AVX-512 BF16 kernel, oneMKL's `cblas_gemm_bf16bf16f32`), in
GFLOP/s, at SmolLM2-135M's shapes for a batch of 4 x 56 tokens, input conversion included. Shows on
the spot whether `cpu_bfloat16` pays on this CPU, and with which gemm.

    .venv/bin/python scripts/bench_gemm.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = [  # M x N x K: (M, K) @ (K, N)
    ("q, o projections", 224, 576, 576),
    ("gate, up projections", 224, 1536, 576),
    ("down projection", 224, 576, 1536),
    ("output layer's logits", 224, 49152, 576),
    ("output layer's gradient", 224, 576, 49152),
    ("square", 2048, 2048, 2048),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    from mlx_lora_api.accel import blas as backend

    blas = backend.prepare()
    import mlx.core as mx

    from mlx_lora_api.accel import bf16
    from scripts.bench_train import machine

    def rate(flop: float, step) -> float:
        """The median of `repeats` calls after three warm-up calls (thread pools, buffers, clocks)."""
        for _ in range(3):
            step()
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - started)
        return flop / statistics.median(seconds) / 1e9

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
    verdict = bf16.slower() if not reason else None  # timed before any other oneMKL call
    print()
    print("| matmul | M x N x K | float32 GFLOP/s | " + " | ".join(f"{n} bf16 GFLOP/s" for n in runnable) + " |")
    print("|---|---|---|" + "---|" * len(runnable))
    # Every float32 timing first, and a pause after the verdict's: oneMKL's OpenMP threads keep
    # spinning for 200 ms after a call (KMP_BLOCKTIME), and OpenBLAS timed meanwhile gets one core.
    time.sleep(0.5)
    inputs = {}
    for name, m, n, k in SHAPES:
        a, w = mx.random.normal((m, k)), mx.random.normal((n, k))
        mx.eval(a, w)
        inputs[name] = a, w, rate(2 * m * n * k, lambda: mx.eval(a @ w.T))
    cells: dict[str, list[str]] = {name: [] for name, *_ in SHAPES}
    for engine in runnable:  # oneMKL last: its spinning threads would slow the kernel timed after it
        for name, m, n, k in SHAPES:
            a, w, _ = inputs[name]
            weight = bf16.Weight(w)
            cells[name].append(f"{rate(2 * m * n * k, lambda: weight.product(a, True, engine)):.0f}")
    for name, m, n, k in SHAPES:
        print(f"| {name} | {m} x {n} x {k} | {inputs[name][2]:.0f} | " + " | ".join(cells[name]) + " |")
    if not reason:
        print()
        print(f"training with cpu_bfloat16 here: {verdict or 'bfloat16, ' + bf16.ENGINES[bf16.engine()]}")


if __name__ == "__main__":
    main()
