#!/usr/bin/env python3
"""MLX's compiled element-wise kernels built for this CPU (accel/jit.py) against MLX's own flags:

    .venv/bin/python scripts/bench_jit.py [--rounds 5]

Each round, engines alternating, each in a fresh process with its own JIT cache (MLX reuses a kernel
by name whatever flags built it), warmed up first (the kernels built once):
- mlx-lm's compiled SwiGLU over SmolLM2-135M's 30 blocks (1536 wide): 1 row (one chat's decoding
  step), 8 rows (8 chats'), 288 rows (8 chats' prompts of 36 tokens);
- 8 chats of 64 tokens decoded together by the generation process's Batcher, in process, on the
  bundled SmolLM2-135M-Instruct (float16 weights decoded in float32, as the service does on the
  CPU): the whole batch's wall time, its first step (the prompts) and its median decoding step.
Both engines must give the same 8 answers (checked). With --train WORKLOAD (e.g. chat3), also a
training run each round per engine (scripts/bench_train.py's `service` engine on that workload, in a
process of its own with the engine's JIT cache): its training time, and the same final loss from both
(checked). Medians; prints a table with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_api import bundled_data_dir  # noqa: E402
from bench_retention import machine  # noqa: E402

from mlx_lora_api.accel.jit import FLAGS  # noqa: E402
from mlx_lora_api.tasks.import_gguf import BUNDLED_NAME  # noqa: E402

ENGINES = {
    f"built for this CPU ({' '.join(FLAGS)})": "on",
    "MLX's own flags (no-jit_avx2)": "no-jit_avx2",
}

CHILD = r"""
import hashlib, json, statistics, sys, time
from mlx_lora_api.jobs import process
process.begin("generation", decoding=True)
from mlx_lora_api.accel import jit
import mlx.core as mx
import numpy as np
from mlx_lm.models.activations import swiglu
from mlx_lora_api.tasks import generate

result = {"flags": jit.prepare() is not None}
rng = np.random.default_rng(0)
for rows in (1, 8, 288):
    gates = [mx.array(rng.standard_normal((rows, 1536)).astype(np.float32) * 3) for _ in range(30)]
    ups = [mx.array(rng.standard_normal((rows, 1536)).astype(np.float32)) for _ in range(30)]
    mx.eval(gates, ups, swiglu(gates[0], ups[0]))
    times = []
    for _ in range(21):
        started = time.perf_counter()
        for g, u in zip(gates, ups):
            mx.eval(swiglu(g, u))
        times.append(time.perf_counter() - started)
    result[f"swiglu {rows}"] = statistics.median(times)

CHATS = [[{"role": "user", "content": f"Tell me fact number {i} about the sea, in a few sentences."}] for i in range(8)]
models = generate.ModelCache(4 << 30)
batcher = generate.Batcher(models, 16)

def chats():
    models.clear_prompts()  # every prompt read afresh
    for i, messages in enumerate(CHATS):
        batcher.add(i, sys.argv[1], None, None, messages, 64, 0.0, 1.0, None)
    steps, text = [], {}
    started = time.perf_counter()
    while batcher.busy:
        step = time.perf_counter()
        for i, event in batcher.step():
            if event["type"] == "text":
                text[i] = text.get(i, "") + event["text"]
        steps.append(time.perf_counter() - step)
    return time.perf_counter() - started, steps, text

chats()  # loads the model, builds the kernels
walls, firsts, medians = [], [], []
for _ in range(3):
    wall, steps, text = chats()
    walls.append(wall)
    firsts.append(steps[0])
    medians.append(statistics.median(steps[1:]))
result["chats wall"] = statistics.median(walls)
result["chats first"] = statistics.median(firsts)
result["chats step"] = statistics.median(medians)
result["answers"] = hashlib.sha256(json.dumps(sorted(text.items())).encode()).hexdigest()[:12]
print(json.dumps(result))
"""

ROWS = [
    ("compiled SwiGLU, 30 blocks, 1 row", "swiglu 1"),
    ("compiled SwiGLU, 30 blocks, 8 rows", "swiglu 8"),
    ("compiled SwiGLU, 30 blocks, 288 rows", "swiglu 288"),
    ("8 chats x 64 tokens, in process: wall", "chats wall"),
    ("8 chats: the prompts' step", "chats first"),
    ("8 chats: a decoding step (median)", "chats step"),
]


def train(workload: str, model: Path, env: dict[str, str]) -> dict:
    """bench_train.py's `service` engine on `workload`, in a process of its own: its training time
    and final loss."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--child", "service"]
        command += ["--workload", workload, "--model", str(model), "--out", out]
        child = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if child.returncode != 0:
        raise SystemExit(f"training: {child.stderr[-2000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    return {"train": result["train_seconds"], "train loss": result["final_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train", metavar="WORKLOAD", help="also time bench_train.py's service engine on it")
    args = parser.parse_args()
    data_dir = bundled_data_dir("bench-jit-")
    model = data_dir / "models" / BUNDLED_NAME
    caches = {name: Path(tempfile.mkdtemp(prefix="bench-jit-cache-")) for name in ENGINES}
    runs: dict[str, list[dict]] = {name: [] for name in ENGINES}
    for round_ in range(args.rounds):
        for name, levers in ENGINES.items():
            env = os.environ | {"TMPDIR": str(caches[name]), "MLX_LORA_API_LEVERS": levers}
            child = subprocess.run(
                [sys.executable, "-c", CHILD, str(model)], env=env, capture_output=True, text=True, cwd=ROOT
            )
            if child.returncode != 0:
                raise SystemExit(f"{name}: {child.stderr[-2000:]}")
            runs[name].append(json.loads(child.stdout.strip().splitlines()[-1]))
            if args.train:
                runs[name][-1] |= train(args.train, model, env)
            print(f"round {round_ + 1}: {name} done", file=sys.stderr, flush=True)
    answers = {run["answers"] for name in ENGINES for run in runs[name]}
    losses = {run["train loss"] for name in ENGINES for run in runs[name] if "train loss" in run}
    applied = [run["flags"] for run in runs[next(iter(ENGINES))]]
    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"flags applied: {all(applied)}; the same answers from both: {len(answers) == 1}")
    if args.train:
        print(f"{args.train}: the same final training loss from both: {len(losses) == 1}")
    print(f"medians of {args.rounds} rounds, engines alternating, a fresh process each\n")
    names = list(ENGINES)
    print(f"ms | {' | '.join(names)} | speed-up")
    print("---|" + "---|" * len(names) + "---")
    rows = ROWS + ([(f"training, {args.train} (bench_train.py's service engine)", "train")] if args.train else [])
    for label, key in rows:
        values = [statistics.median(run[key] for run in runs[name]) * 1000 for name in names]
        print(f"{label} | {' | '.join(f'{v:.1f}' for v in values)} | {values[1] / values[0]:.2f}x")


if __name__ == "__main__":
    main()
