#!/usr/bin/env python3
"""What preference tuning costs against SFT on the same data, side by side: SFT on the chosen
answers (prompt/completion, answers only), DPO and ORPO on the preference rows, each in a fresh
process, rounds alternating.

    .venv/bin/python scripts/bench_preference.py [--rounds 2] [--epochs 2]

The data is tests/test_preference_end_to_end.py's: 24 questions whose chosen answer greets like a
pirate and whose rejected answer is the same answer plain, 8 more held out. The bundled
SmolLM2-135M-Instruct, learning_rate 1e-4, batch 4, 8 layers, the retention check off. Wall time
is the whole `train_adapter` call in the child (DPO's includes its reference pass); peak is its
maximum RSS (VmHWM); accuracy is the held-out reward accuracy before and after (DPO and ORPO).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

CHILD = """
import json, sys, time
from pathlib import Path
from mlx_lora_api.accel import blas; blas.prepare()
import msgspec
from mlx_lora_api.tasks import finetune
from mlx_lora_api.types import FinetuneRequest
base, out, request = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
out.mkdir()
events = []
started = time.perf_counter()
metrics = finetune.train_adapter(base, "smollm2", msgspec.json.decode(request, type=FinetuneRequest), out,
                                 events.append)
wall = time.perf_counter() - started
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
val = [e for e in events if e["type"] == "val"]
train = [e for e in events if e["type"] == "train"]
print(json.dumps({"wall": wall, "peak": peak, "iterations": metrics["iterations"],
                  "tokens": metrics["trained_tokens"],
                  "step_tokens_per_second": sum(e["tokens_per_second"] for e in train) / len(train),
                  "before": val[0].get("val_reward_accuracy"), "after": val[-1].get("val_reward_accuracy")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    from bench_retention import machine

    from mlx_lora_api import registry
    from mlx_lora_api.registry.gguf import register
    from mlx_lora_api.tasks import import_gguf as gguf_import

    sys.path.insert(0, str(ROOT / "tests"))
    from test_preference_end_to_end import preference_rows

    data = Path(tempfile.mkdtemp(prefix="bench-preference-"))
    base = register(gguf_import.bundled_gguf_path(), registry.Registry(data, "m"), "smollm2")
    train, held_out = preference_rows()
    common = {
        "learning_rate": 1e-4,
        "epochs": args.epochs,
        "batch_size": 4,
        "num_layers": 8,
        "steps_per_eval": 1000,
        "retention_check": False,
    }

    def sft(rows):
        return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]

    variants = {
        "SFT on the chosen answers": {
            "training_data": sft(train),
            "validation_data": sft(held_out),
            "parameters": {**common, "mask_prompt": True, "rehearsal": 0},
        },
        "DPO (beta 0.1)": {
            "training_data": train,
            "validation_data": held_out,
            "parameters": {**common, "method": "dpo"},
        },
        "ORPO (lambda 0.1)": {
            "training_data": train,
            "validation_data": held_out,
            "parameters": {**common, "method": "orpo"},
        },
    }
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, body in variants.items():
            request = {"base_model": "smollm2", **body}
            with tempfile.TemporaryDirectory() as out:
                child = subprocess.run(
                    [sys.executable, "-c", CHILD, str(base), str(Path(out) / "a"), json.dumps(request)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                )
            if child.returncode != 0:
                raise SystemExit(f"{name} failed: {child.stderr[-2000:]}")
            results[name].append(json.loads(child.stdout.strip().splitlines()[-1]))

    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"data: {len(train)} rows, {len(held_out)} held out; {args.epochs} epochs, batch 4, 8 layers")
    print()
    print(
        "| run | steps | answer tokens | wall s (median) | step tokens/s | peak MiB (median) | held-out reward accuracy |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        last = runs[-1]
        accuracy = "-" if last["before"] is None else f"{last['before']:.2f} -> {last['after']:.2f}"
        print(
            f"| {name} | {last['iterations']} | {last['tokens']} | {statistics.median(r['wall'] for r in runs):.1f} "
            f"| {statistics.median(r['step_tokens_per_second'] for r in runs):.0f} "
            f"| {statistics.median(r['peak'] for r in runs):.0f} | {accuracy} |"
        )


if __name__ == "__main__":
    main()
