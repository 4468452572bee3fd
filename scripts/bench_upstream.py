#!/usr/bin/env python3
"""The three things in MLX's CPU backend that stand in this project's way, each reduced to a few
lines and timed side by side against numpy and PyTorch on the same machine, for the reports in
docs/upstream/:

1. `exp`: MLX's `mx.exp` against numpy's (vectorized) and PyTorch's, float32;
2. element-wise ops on one thread: `a * b + c` over large arrays, MLX against PyTorch (which
   splits them over the cores) and numpy;
3. bfloat16 matmul: MLX's bfloat16 `matmul` against its own float32, and PyTorch's bfloat16 (oneDNN).

    .venv/bin/python scripts/bench_upstream.py [--rounds 5]

PyTorch runs in the test-only venv (`.venv-bench`, made by `./scripts/setup --for-tests`), in a
child process; without it those columns are empty. MLX runs as the `mlx[cpu]` wheel with OpenBLAS
loaded first (what the service does). Medians of --rounds, after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

N_ELEMENTS = 11_000_000  # a training step's largest activations (SmolLM2: 4 x 488 tokens x 1536 x ~4)
MATMUL = (512, 576, 1536)  # a training step's MLP product (4 x 128 tokens through 576 x 1536)

TORCH_CHILD = """
import json, statistics, sys, time
import torch
rounds, n, (m, k, nn) = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
def timed(f):
    f()
    times = []
    for _ in range(rounds):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return statistics.median(times)
x = torch.randn(n) * 4
a, b, c = torch.randn(n), torch.randn(n), torch.randn(n)
wa, wb = torch.randn(m, k), torch.randn(k, nn)
ha, hb = wa.bfloat16(), wb.bfloat16()
print(json.dumps({
    "threads": torch.get_num_threads(),
    "exp": timed(lambda: torch.exp(x)),
    "fma": timed(lambda: a * b + c),
    "matmul_f32": timed(lambda: wa @ wb),
    "matmul_bf16": timed(lambda: ha @ hb),
}))
"""


def timed(f, rounds: int) -> float:
    f()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        f()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def torch_figures(rounds: int) -> dict | None:
    python = ROOT / ".venv-bench" / "bin" / "python"
    if not python.exists():
        return None
    run = subprocess.run(
        [str(python), "-c", TORCH_CHILD, str(rounds), str(N_ELEMENTS), json.dumps(MATMUL)],
        capture_output=True,
        text=True,
    )
    return json.loads(run.stdout) if run.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from mlx_lora_api.accel import blas

    blas.prepare()
    import mlx.core as mx
    import numpy as np
    from bench_retention import machine

    rounds = args.rounds
    rng = np.random.default_rng(0)
    x_np = (rng.standard_normal(N_ELEMENTS) * 4).astype(np.float32)
    a_np, b_np, c_np = (rng.standard_normal(N_ELEMENTS).astype(np.float32) for _ in range(3))
    x, a, b, c = (mx.array(v) for v in (x_np, a_np, b_np, c_np))
    m, k, n = MATMUL
    wa, wb = mx.random.normal((m, k)), mx.random.normal((k, n))
    ha, hb = wa.astype(mx.bfloat16), wb.astype(mx.bfloat16)
    mx.eval(x, a, b, c, wa, wb, ha, hb)

    mlx = {
        "exp": timed(lambda: mx.eval(mx.exp(x)), rounds),
        "fma": timed(lambda: mx.eval(a * b + c), rounds),
        "matmul_f32": timed(lambda: mx.eval(wa @ wb), rounds),
        "matmul_bf16": timed(lambda: mx.eval(ha @ hb), rounds),
    }
    # The same with glibc keeping freed memory (what the service's training processes do): MLX's
    # CPU allocations of this size otherwise come from a fresh mmap each, faulted in page by page.
    blas.keep_freed_memory()
    kept = {
        "exp": timed(lambda: mx.eval(mx.exp(x)), rounds),
        "fma": timed(lambda: mx.eval(a * b + c), rounds),
    }
    numpy = {
        "exp": timed(lambda: np.exp(x_np), rounds),
        "fma": timed(lambda: a_np * b_np + c_np, rounds),
    }
    torch = torch_figures(rounds) or {}
    # How many of this machine's cores MLX's element-wise op keeps busy: CPU time over wall time.
    started_cpu, started = time.process_time(), time.perf_counter()
    for _ in range(rounds):
        mx.eval(a * b + c)
    mlx_cores = (time.process_time() - started_cpu) / (time.perf_counter() - started)

    flops = 2 * m * k * n
    print(f"machine: {machine()}; BLAS: {blas.describe()['blas']}")
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"mlx {mx.__version__}, numpy {np.__version__}, torch threads {torch.get('threads', '-')}; medians of {rounds}\n"
    )
    print("| operation | MLX | MLX, freed memory kept | numpy | PyTorch |")
    print("|---|---|---|---|---|")

    def ms(v: float | None) -> str:
        return f"{v * 1e3:.1f} ms" if v else "-"

    def gf(v: float | None) -> str:
        return f"{flops / v / 1e9:.0f} GFLOP/s" if v else "-"

    for name, label in (("exp", "exp"), ("fma", "a * b + c")):
        row = [ms(mlx[name]), ms(kept[name]), ms(numpy[name]), ms(torch.get(name))]
        print(f"| {label}, {N_ELEMENTS:,} float32 | {' | '.join(row)} |")
    for name, dtype in (("matmul_f32", "float32"), ("matmul_bf16", "bfloat16")):
        print(f"| matmul {m}x{k} @ {k}x{n}, {dtype} | {gf(mlx[name])} | - | - | {gf(torch.get(name))} |")
    print(f"\nMLX's a * b + c kept {mlx_cores:.2f} of {os.cpu_count()} cores busy (CPU time / wall time).")


if __name__ == "__main__":
    main()
