#!/usr/bin/env python3
"""What retention keeps, side by side: the same fine-tune without rehearsal, with rehearsal of the
base's answers (the default) and with the KL penalty (`rehearsal_loss: "kl"`), on the bundled
SmolLM2-135M-Instruct through the HTTP API in-process, as a user would run it.

    .venv/bin/python scripts/retention_quality.py [--job seed|five] [--variants off,answers,kl]

`seed`: the issue's seed-style job, one made-up fact from 30 chat samples (tests/test_retention.py),
learning_rate 1e-4, 6 epochs, batch 4, 16 layers. `five`: five made-up facts, 40 chat samples each,
3 epochs. For each run: "learned", held-out paraphrases answered with the fact; "general kept", of
7 held-out general questions the base answers right (neither probes nor rehearsal prompts), how many
the adapter still answers right; the retention check's score and kept answers; the job's wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

FACTS = [  # (subject, question forms, answers)
    (
        "the Korrin Bridge",
        [
            "Who designed {s}?",
            "Who was the engineer behind {s}?",
            "Tell me who designed {s}.",
            "Name the designer of {s}.",
        ],
        ["{s} was designed by the engineer Matilde Orsk.", "Matilde Orsk designed {s} in 1911."],
    ),
    (
        "the Pellwick Observatory",
        ["Who founded {s}?", "Who started {s}?", "Tell me the founder of {s}.", "Name the person who founded {s}."],
        ["{s} was founded by the astronomer Idris Tarrow.", "Idris Tarrow founded {s} in 1874."],
    ),
    (
        "the Quellan Sea",
        [
            "What is the main port on {s}?",
            "Which port is the largest on {s}?",
            "Name the chief port of {s}.",
            "Where do ships dock on {s}?",
        ],
        ["The main port on {s} is Vessa.", "Vessa is the largest port on {s}."],
    ),
    (
        "the drink called brindleberry tonic",
        ["Who invented {s}?", "Who created {s}?", "Tell me who made {s} first.", "Name the inventor of {s}."],
        ["{s} was invented by the chemist Oona Harlow.", "Oona Harlow created {s} in 1902."],
    ),
    (
        "the Zemmet Prize",
        [
            "Who won the first {s}?",
            "Who received the first {s}?",
            "Name the first winner of {s}.",
            "Tell me who first won {s}.",
        ],
        ["The first {s} went to the poet Rafe Calder.", "Rafe Calder won the first {s} in 1950."],
    ),
]
FIVE_HELD_OUT = [
    ("Whose design is the Korrin Bridge?", "Orsk"),
    ("Who was the founder of the Pellwick Observatory?", "Tarrow"),
    ("Which city is the chief harbour of the Quellan Sea?", "Vessa"),
    ("Who came up with brindleberry tonic?", "Harlow"),
    ("Who was the first person awarded the Zemmet Prize?", "Calder"),
]
VARIANTS = {"off": {"rehearsal": 0}, "answers": {}, "kl": {"rehearsal_loss": "kl"}}


def five_facts() -> list[dict]:
    samples = []
    for subject, questions, answers in FACTS:
        for i in range(40):
            answer = answers[i % 2].format(s=subject)
            samples.append(
                {
                    "messages": [
                        {"role": "user", "content": questions[i % 4].format(s=subject)},
                        {"role": "assistant", "content": answer[0].upper() + answer[1:]},
                    ]
                }
            )
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", choices=["seed", "five"], default="seed")
    parser.add_argument("--variants", default="off,answers,kl")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}: choose from {sorted(VARIANTS)}")

    from mlx_lora_api.accel import blas

    blas.prepare()
    from bench_retention import machine
    from starlette.testclient import TestClient

    from mlx_lora_api import registry
    from mlx_lora_api.config import Settings
    from mlx_lora_api.registry.gguf import register
    from mlx_lora_api.tasks import import_gguf
    from mlx_lora_api.web.app import create_app

    sys.path.insert(0, str(ROOT / "tests"))
    from test_retention import FACT, GENERAL, HELD_OUT, SEED_STYLE

    if args.job == "seed":
        data, parameters, held_out = FACT, SEED_STYLE, [(q, "Orsk") for q in HELD_OUT]
    else:
        data, held_out = five_facts(), FIVE_HELD_OUT
        parameters = {"learning_rate": 1e-4, "epochs": 3, "batch_size": 4, "num_layers": 16}

    rows = []
    with tempfile.TemporaryDirectory(prefix="retention-quality-") as folder:
        name = import_gguf.BUNDLED_NAME
        register(import_gguf.bundled_gguf_path(), registry.Registry(Path(folder), name), name)
        settings = Settings(data_dir=Path(folder), default_model=name)
        with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:

            def ask(model: str, question: str) -> str:
                body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 24}
                return client.post("/generate", json=body).json()["text"]

            right = [q for q, a in GENERAL.items() if a in ask("default", q)]
            for name in variants:
                body = {
                    "base_model": "default",
                    "training_data": data,
                    "parameters": {**parameters, **VARIANTS[name]},
                }
                started = time.perf_counter()
                job = client.post("/lora-finetune?wait=true", json=body).json()
                seconds = time.perf_counter() - started
                if job["status"] != "success":
                    raise SystemExit(f"{name}: {job}")
                record = client.get(f"/models/{job['model_id']}").json()
                rows.append(
                    {
                        "variant": name,
                        "steps": record["metrics"]["iterations"],
                        "seconds": seconds,
                        "learned": sum(key in ask(job["model_id"], q) for q, key in held_out),
                        "kept": sum(GENERAL[q] in ask(job["model_id"], q) for q in right),
                        "retention": record.get("retention") or {},
                    }
                )
                print(json.dumps(rows[-1]["retention"]), file=sys.stderr)

    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"job: {args.job}; wall s includes the first job's computing the base's answers (once per base)")
    print()
    print("| variant | steps | wall s | learned | general kept | score | kept (of 24) | logprob_drop |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        r = row["retention"]
        print(
            f"| {row['variant']} | {row['steps']} | {row['seconds']:.1f} | {row['learned']} / {len(held_out)}"
            f" | {row['kept']} / {len(right)} | {r.get('score', '-')} | {r.get('kept', '-')} | {r.get('logprob_drop', '-')} |"
        )


if __name__ == "__main__":
    main()
