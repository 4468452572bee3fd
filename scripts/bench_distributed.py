#!/usr/bin/env python3
"""A fine-tune on two ranks on loopback (ring, through mlx.launch) against the same fine-tune on
one rank, side by side through one real server (`serve --ranks 2`), rounds alternating.

    .venv/bin/python scripts/bench_distributed.py [--rounds 2] [--samples 64] [--batch 8]

The bundled SmolLM2-135M-Instruct, chat samples, 1 epoch, 8 layers, learning rate 1e-4, the
retention check and rehearsal off. Wall time is the whole `?wait=true` request (each rank loads
the model); tokens/s is the train events' (global: every rank's tokens); peak memory is each
rank's maximum RSS (one rank: the worker's). On this machine both ranks share its cores, so this
measures the overhead of the engine, not a speed-up: see docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def samples(n: int) -> list[dict]:
    topics = ["rivers", "mountains", "the moon", "bread", "bicycles", "owls", "rain", "chess"]
    return [
        {
            "messages": [
                {"role": "user", "content": f"Tell me one thing about {topics[i % len(topics)]} (note {i})."},
                {"role": "assistant", "content": f"Here is one thing about {topics[i % len(topics)]}: it is {i}."},
            ]
        }
        for i in range(n)
    ]


def run(url: str, body: dict) -> dict:
    started = time.perf_counter()
    r = httpx.post(f"{url}/lora-finetune?wait=true", json=body, timeout=3600)
    wall = time.perf_counter() - started
    answer = r.json()
    if answer.get("status") != "success":
        raise SystemExit(f"the fine-tune failed: {answer}")
    train = []
    with httpx.stream("GET", f"{url}/jobs/{answer['job_id']}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "train":
                    train.append(event)
                elif event["type"] == "estimate":
                    worker_peak = event["peak_memory_bytes"] / 2**20
    return {
        "wall": wall,
        "tokens_per_second": statistics.median(e["tokens_per_second"] for e in train),
        "model_id": answer["model_id"],
        "worker_peak": worker_peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    from bench_api import bundled_data_dir, free_port, start_server
    from bench_retention import machine

    from mlx_lora_api.tasks import import_gguf as gguf_import

    data_dir = bundled_data_dir("bench-distributed-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server, _ = start_server(data_dir, port, data_dir / "server.log", "--ranks", "2")
    try:
        parameters = {
            "learning_rate": 1e-4,
            "epochs": 1,
            "batch_size": args.batch,
            "num_layers": 8,
            "retention_check": False,
            "rehearsal": 0,
        }
        results: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for ranks in (2, 1):
                body = {
                    "base_model": gguf_import.BUNDLED_NAME,
                    "training_data": samples(args.samples),
                    "parameters": {**parameters, "ranks": ranks},
                }
                result = run(url, body)
                meta = json.loads((data_dir / "adapters" / result["model_id"] / "meta.json").read_text())
                result["peaks"] = meta["metrics"].get("rank_peak_memory_mib") or [round(result["worker_peak"])]
                results[ranks].append(result)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(data_dir, ignore_errors=True)

    print(f"machine: {machine()}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"{args.samples} chat samples, batch {args.batch}, 1 epoch, 8 layers; medians of {args.rounds} rounds\n")
    print("| ranks | wall s | tokens/s (global) | peak MiB per rank |")
    print("|---|---|---|---|")
    for ranks in (1, 2):
        runs = results[ranks]
        peaks = [statistics.median(r["peaks"][i] for r in runs) for i in range(ranks)]
        print(
            f"| {ranks} | {statistics.median(r['wall'] for r in runs):.1f} "
            f"| {statistics.median(r['tokens_per_second'] for r in runs):.0f} "
            f"| {' / '.join(f'{p:.0f}' for p in peaks)} |"
        )


if __name__ == "__main__":
    main()
