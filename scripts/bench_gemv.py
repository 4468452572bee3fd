#!/usr/bin/env python3
"""Decoding's products, side by side: a token's worth of SmolLM2-135M's block weights (30 blocks of
q/k/v stacked, o, gate/up stacked, down; random, float16 values), each product once, as a decoding step
makes them, for 1 to 8 rows:

    .venv/bin/python scripts/bench_gemv.py [--rounds 7] [--blocks 30]

- OpenBLAS's `cblas_sgemm` called directly (what MLX calls without the shim; it packs the weight);
- OpenBLAS's `cblas_sgemv` (one row only; the shim's one-row path before it took one row itself);
- the shim's few-rows kernel over the float32 weights (accel/gemv.c; one row on every core but one, as
  a one-stream decoding step runs it beside the Python thread, more rows on every core);
- the same kernel reading each weight's float16 copy (`Shadows`, as tasks/decoding.py registers them);
- where the CPU has AVX-512VL (the kernel then takes 8 rows a tile), both again in 4-row tiles, as on AVX2.

The weights stream from memory (far more than the caches hold), as in decoding. Engines alternate
round after round; medians. Prints a table with the machine and the command.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_api import machine  # noqa: E402

from mlx_lora_api.accel import blas, gemv  # noqa: E402

SHAPES = [(576 + 2 * 192, 576), (576, 576), (2 * 1536, 576), (576, 1536)]  # SmolLM2-135M's (n, k)
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--blocks", type=int, default=30)
    args = parser.parse_args()
    path = blas.prepare(decoding=True)
    shim = blas.shim()
    if path is None or shim is None:
        raise SystemExit("the shim is not loaded: run ./scripts/setup (Linux, OpenBLAS)")
    import numpy as np

    openblas = ctypes.CDLL(path)  # its own symbols, not the shim's ahead of it
    pointer, f, integer = ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    # alpha, a, lda, b (or x), ldb (or incx), beta, c (or y), ldc (or incy): after 6 ints for sgemm, 4 for sgemv
    operands = [f, pointer, integer, pointer, integer, f, pointer, integer]
    for function in (shim.cblas_sgemm, openblas.cblas_sgemm):
        function.argtypes = [integer] * 6 + operands
    openblas.cblas_sgemv.argtypes = [integer] * 4 + operands
    rng = np.random.default_rng(0)
    weights = [
        rng.standard_normal((n, k), dtype=np.float32).astype(np.float16).astype(np.float32)
        for _ in range(args.blocks)
        for n, k in SHAPES
    ]
    total = sum(w.nbytes for w in weights)

    def run(engine: str, rows: int) -> float:
        inputs = {k: rng.standard_normal((rows, k), dtype=np.float32) for _, k in SHAPES}
        outputs = {n: np.empty((rows, n), np.float32) for n, _ in SHAPES}
        started = time.perf_counter()
        for w in weights:
            n, k = w.shape
            x, c = inputs[k], outputs[n]
            if engine == "OpenBLAS sgemv":
                openblas.cblas_sgemv(
                    ROW_MAJOR, NO_TRANS, n, k, 1.0, w.ctypes.data, k, x.ctypes.data, 1, 0.0, c.ctypes.data, 1
                )
                continue
            sgemm = openblas.cblas_sgemm if engine == "OpenBLAS sgemm" else shim.cblas_sgemm
            sgemm(
                ROW_MAJOR, NO_TRANS, TRANS, rows, n, k, 1.0, x.ctypes.data, k, w.ctypes.data, k, 0.0, c.ctypes.data, n
            )
        return time.perf_counter() - started

    engines = ["OpenBLAS sgemm", "OpenBLAS sgemv", "shim, float32 weights", "shim, float16 copies"]
    wide = shim.mlx_lora_api_wide_tiles(-1)
    if wide:  # AVX-512VL: the shim takes 8 rows a tile; and as on AVX2, 4
        engines += ["shim, float32 weights, 4-row tiles", "shim, float16 copies, 4-row tiles"]
    figures: dict[tuple[str, int], list[float]] = {}
    for rows in (1, 2, 4, 8):
        for _ in range(args.rounds):
            for engine in engines:
                if (engine == "OpenBLAS sgemv" and rows > 1) or ("4-row tiles" in engine and rows <= 4):
                    continue
                copies = gemv.Shadows(shim, weights) if "float16 copies" in engine else None
                shim.mlx_lora_api_wide_tiles(0 if "4-row tiles" in engine else wide)
                figures.setdefault((engine, rows), []).append(run(engine, rows))
                del copies
    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"{args.blocks} blocks of SmolLM2-135M's weights, {total / 2**20:.0f} MiB in float32; medians of {args.rounds}\n"
    )
    print("rows | " + " | ".join(engines))
    print("---|" + "---|" * len(engines))
    for rows in (1, 2, 4, 8):
        cells = []
        for engine in engines:
            runs = figures.get((engine, rows))
            if not runs:
                cells.append("")
                continue
            seconds = statistics.median(runs)
            read = total / (2 if "float16" in engine else 1)
            cells.append(f"{seconds * 1e3:.1f} ms ({read / seconds / 1e9:.0f} GB/s)")
        print(f"{rows} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
