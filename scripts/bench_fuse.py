#!/usr/bin/env python3
"""Fusing and quantizing, side by side: the service's fuse (with its parity check) against
`mlx_lm.fuse`, and its quantize job's task against `mlx_lm.convert -q`.

    .venv/bin/python scripts/bench_fuse.py [--rounds 3]

Same base (the bundled SmolLM2-135M-Instruct) and the same rank-8 adapter on 16 blocks; each run
a fresh process; wall time includes loading and saving; peak is the process's maximum RSS
(VmHWM, printed by the process itself as it exits).
Both keep the stored float16; the service checks each fused layer's output against the LoRA
layer's in float32 (tasks/fuse.py), mlx_lm.fuse checks nothing. Quantizing is to 4 bits in groups
of 64 both ways. The service saves one tensor at a time from a lazily loaded model
(tasks/saving.py); mlx-lm holds the whole model.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVICE = (
    "import sys; from pathlib import Path\n"
    "from mlx_lora_api.accel import blas; blas.prepare()\n"
    "from mlx_lora_api.tasks import fuse as fusing\n"
    "fusing.fuse_adapter(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))\n"
)
SERVICE_QUANTIZE = (
    "import sys; from pathlib import Path\n"
    "from mlx_lora_api.accel import blas; blas.prepare()\n"
    "from mlx_lora_api.tasks import quantize as quantizing\n"
    "quantizing.quantize(Path(sys.argv[1]), Path(sys.argv[2]), 4, 64)\n"
)
MLX_LM = "import runpy, sys; sys.argv[0] = 'mlx_lm'; runpy.run_module('mlx_lm', run_name='__main__')\n"
# Each child prints its own peak: wait4's ru_maxrss would start from this parent's high-water mark
# (Linux keeps it across fork and exec), and this parent trains the adapter first.
PEAK = (
    "\nimport atexit\n"
    "atexit.register(lambda: print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0]))\n"
)


def run(command: list[str]) -> tuple[float, float]:
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if process.returncode != 0:
        raise SystemExit(f"{command[:3]} failed: {process.stderr[-2000:]}")
    peak_kib = [line.split()[1] for line in process.stdout.splitlines() if line.startswith("VmHWM ")][-1]
    return time.perf_counter() - started, int(peak_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from bench_retention import machine  # the CPU with its family (Zen 4 is 25, Zen 5 26)

    from mlx_lora_api.accel import blas

    blas.prepare()
    import msgspec

    from mlx_lora_api import registry
    from mlx_lora_api.registry.gguf import register
    from mlx_lora_api.tasks import finetune as training
    from mlx_lora_api.tasks import import_gguf as gguf_import
    from mlx_lora_api.types import FinetuneRequest

    data = Path(tempfile.mkdtemp(prefix="bench-fuse-"))
    base = register(gguf_import.bundled_gguf_path(), registry.Registry(data, "m"), "smollm2")
    adapter = data / "adapter"
    adapter.mkdir()
    request = msgspec.convert(
        {
            "base_model": "smollm2",
            "training_data": ["The mayor of Zorbington is Elara."],
            "parameters": {"epochs": 2, "learning_rate": 1e-4},
        },
        FinetuneRequest,
    )
    training.train_adapter(str(base), "smollm2", request, adapter)

    engines = {
        "service (float16, each fused layer checked)": lambda out: [
            sys.executable,
            "-c",
            PEAK + SERVICE,
            str(base),
            str(adapter),
            out,
        ],
        "mlx_lm.fuse (float16)": lambda out: [
            sys.executable,
            "-c",
            PEAK + MLX_LM,
            "fuse",
            "--model",
            str(base),
            "--adapter-path",
            str(adapter),
            "--save-path",
            out,
        ],
        "service quantize (4 bits, groups of 64)": lambda out: [
            sys.executable,
            "-c",
            PEAK + SERVICE_QUANTIZE,
            str(base),
            out,
        ],
        "mlx_lm.convert -q (4 bits, groups of 64)": lambda out: [
            sys.executable,
            "-c",
            PEAK + MLX_LM,
            "convert",
            "--hf-path",
            str(base),
            "--mlx-path",
            out,
            "-q",
            "--q-bits",
            "4",
            "--q-group-size",
            "64",
        ],
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, command in engines.items():
            with tempfile.TemporaryDirectory() as out:
                results[name].append(run(command(str(Path(out) / "fused"))))

    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print()
    print("| engine | wall s (median) | peak MiB (median) | every run (s / MiB) |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        each = ", ".join(f"{w:.2f} / {p:.0f}" for w, p in runs)
        print(
            f"| {name} | {statistics.median(r[0] for r in runs):.2f} | {statistics.median(r[1] for r in runs):.0f} | {each} |"
        )


if __name__ == "__main__":
    main()
