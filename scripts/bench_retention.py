#!/usr/bin/env python3
"""What retention costs, side by side: the same fine-tune with neither the check nor rehearsal,
with the check only, with both (the default), and with both and `rehearsal_loss: "kl"`, each in a
fresh process, rounds alternating.

    .venv/bin/python scripts/bench_retention.py [--rounds 2] [--rehearsal 0.5]

The job is the issue's: the bundled SmolLM2-135M-Instruct taught one made-up fact from 30 chat
samples, learning_rate 1e-4, 6 epochs, batch 4, 16 layers. The base's answers to the retention
prompts are computed once before the rounds (their time is printed apart: a one-time cost per
base, kept in the data folder); every run then reads them from the cache, as a second job does.
Wall time is the whole `train_adapter` call in the child; peak is its maximum RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, time
from pathlib import Path
from mlx_lora_api.accel import blas; blas.prepare()
import msgspec
from mlx_lora_api.tasks import finetune
from mlx_lora_api.types import FinetuneRequest
base, cache, out, request = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
out.mkdir()
started = time.perf_counter()
metrics = finetune.train_adapter(base, "smollm2", msgspec.json.decode(request, type=FinetuneRequest), out,
                                 retention_cache=cache)
wall = time.perf_counter() - started
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"wall": wall, "peak": peak, "retention": metrics.get("retention", {}).get("score"),
                  "iterations": metrics["iterations"]}))
"""


def fact_samples() -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_retention import FACT

    return FACT


def machine() -> str:
    cpu, family = platform.machine(), "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("cpu family"):
                family = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{cpu} (family {family}), {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rehearsal", type=float, default=0.5)
    args = parser.parse_args()

    from mlx_lora_api.accel import blas

    blas.prepare()
    from mlx_lm.utils import load

    from mlx_lora_api import device, registry
    from mlx_lora_api.registry.gguf import register
    from mlx_lora_api.tasks import finetune
    from mlx_lora_api.tasks import import_gguf as gguf_import
    from mlx_lora_api.tuner import retention
    from mlx_lora_api.types import Parameters

    data = Path(tempfile.mkdtemp(prefix="bench-retention-"))
    base = register(gguf_import.bundled_gguf_path(), registry.Registry(data, "m"), "smollm2")
    cache = data / "cache"
    model, tokenizer = load(str(base))
    device.cast_for_compute(model)
    finetune.prepare_model(model, Parameters(), 16)
    started = time.perf_counter()
    retention.reference(model, tokenizer, str(base), cache, lambda event: None)
    reference_seconds = time.perf_counter() - started
    del model

    seed_style = {"learning_rate": 1e-4, "epochs": 6, "batch_size": 4, "num_layers": 16}
    variants = {
        "neither (retention_check false, rehearsal 0)": {"retention_check": False, "rehearsal": 0},
        "the check only (rehearsal 0)": {"rehearsal": 0},
        f"the check and rehearsal {args.rehearsal} (the default)": {"rehearsal": args.rehearsal},
        f"the check and rehearsal {args.rehearsal}, rehearsal_loss kl": {
            "rehearsal": args.rehearsal,
            "rehearsal_loss": "kl",
        },
    }
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, extra in variants.items():
            request = {"base_model": "smollm2", "training_data": fact_samples(), "parameters": {**seed_style, **extra}}
            with tempfile.TemporaryDirectory() as out:
                child = subprocess.run(
                    [sys.executable, "-c", CHILD, str(base), str(cache), str(Path(out) / "a"), json.dumps(request)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                )
            if child.returncode != 0:
                raise SystemExit(f"{name} failed: {child.stderr[-2000:]}")
            results[name].append(json.loads(child.stdout.strip().splitlines()[-1]))

    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"the base's answers (24 probes, 48 rehearsal prompts), once per base: {reference_seconds:.1f} s")
    print()
    print("| variant | steps | wall s (median) | peak MiB (median) | retention | every run (s / MiB) |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        each = ", ".join(f"{r['wall']:.1f} / {r['peak']:.0f}" for r in runs)
        score = runs[-1]["retention"]
        print(
            f"| {name} | {runs[-1]['iterations']} | {statistics.median(r['wall'] for r in runs):.1f} "
            f"| {statistics.median(r['peak'] for r in runs):.0f} | {'-' if score is None else score} | {each} |"
        )


if __name__ == "__main__":
    main()
