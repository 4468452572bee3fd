#!/usr/bin/env python3
"""Decoding speed: the service's /generate against llama.cpp on the service's own GGUF export.

    .venv/bin/python scripts/bench_decode.py [--rounds 3] [--tokens 128] [--chats 8]

Each round, engines alternating, on the bundled SmolLM2-135M-Instruct (greedy, the same chat):
- one stream: a chat's answer of --tokens tokens, streamed; decode tokens/s from the first token
  to the last (llama.cpp's own `predicted_per_second`), and the whole request's wall time;
  the service as it ships (the products of 1 to 8 rows in the shim's kernels, accel/gemv.c, reading
  the float16 copies of the model's weights), with MLX_LORA_API_LEVERS=no-half_weights (the same
  kernels over the float32 weights), with no-kept_prompts (every prompt read afresh), with
  no-jit_avx2 (MLX's compiled element-wise kernels built with MLX's own flags, accel/jit.py; each
  engine keeps its own JIT cache), with no-compiled_attention (MLX's own softmax in attention,
  tasks/decoding.py) and with MLX_LORA_API_LEVERS=off (MLX's sgemm for every product);
- a long prompt (about 780 tokens, read afresh in every engine): the whole request for its first
  token, what a user waits for before an answer begins;
- --chats concurrent chats of 64 tokens (each asks for a long story: every answer runs to 64 tokens, in
  both engines; the table says how many came): every answer's tokens over the wall time, the service
  decoding them as one batch, llama.cpp with as many parallel slots; and the service answering
  the same chats one after another (what it did before it batched);
- the same chats spread over --adapters LoRA adapters of the model (rank 8 on every projection,
  random weights: the speed is the point, tests/test_generation.py checks the answers), all at
  once: the service decodes them as one batch, each row with its own adapter (tasks/mixing.py);
  and one adapter's chats after another's (what it did before: a batch per adapter).
Both keep what they computed for earlier prompts, as each ships: llama.cpp's server reuses a slot's
keys and values for the common start of its next prompt (`cache_prompt`, its default); the service
keeps its latest answers' (tasks/generate.py), so the chats reuse the warm-up chat's system prompt, and
the service's one-after-another chats, which follow its at-once ones, their whole prompts. Each engine
is a fresh server every round.
llama.cpp (the xllamacpp wheel, 2 threads) runs the float16 GGUF the service's export job writes,
and the same weights in float32 (written by the same exporter for this script: the service
computes in float32 on the CPU). Prints a table with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_api import bundled_data_dir, machine, start_server  # noqa: E402
from servers import free_port  # noqa: E402

QUESTION = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
# Each asks for more than 64 tokens, so that every answer runs to the limit in both engines (greedy
# decoding of float16 and float32 arithmetic parts ways, and a batch's speed in all depends on how long
# its answers are: the earlier "fact about the sea" chats ended after 16 to 64 tokens, differently in each).
CHATS = [
    [{"role": "user", "content": f"Write a long, detailed story about the sea, story number {i}."}] for i in range(64)
]
MODEL = "smollm2-135m-instruct"
# About 780 tokens with the chat template: what a user waits for before the first token of an answer.
LONG = [
    {
        "role": "user",
        "content": "The sea is wide and deep, and sailors have told stories about it for thousands of years. " * 40
        + "Tell me the story of one of them.",
    }
]

LLAMA = """
import sys, json, time
import xllamacpp
params = xllamacpp.CommonParams()
params.model.path = sys.argv[1]
params.hostnames = ["127.0.0.1"]
params.port = int(sys.argv[2])
params.n_parallel = int(sys.argv[3])
params.n_ctx = 1024 * int(sys.argv[3])
params.cpuparams.n_threads = 2
params.cpuparams_batch.n_threads = 2
params.use_jinja = True
server = xllamacpp.Server(params)
print("ready", flush=True)
sys.stdin.read()
"""


class Llama:
    def __init__(self, gguf: Path, slots: int):
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-c", LLAMA, str(gguf), str(self.port), str(slots)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready", gguf
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=600)
        while self.client.get("/health").status_code != 200:
            time.sleep(0.1)

    def prompt(self, messages: list[dict]) -> list[int]:
        text = self.client.post("/apply-template", json={"messages": messages}).json()["prompt"]
        body = {"content": text, "add_special": False, "parse_special": True}
        return self.client.post("/tokenize", json=body).json()["tokens"]

    def chat(self, messages: list[dict], tokens: int) -> tuple[int, float, float]:
        """(tokens generated, decode tokens/s, wall seconds)"""
        body = {"prompt": self.prompt(messages), "n_predict": tokens, "temperature": 0.0, "top_k": 1}
        started = time.perf_counter()
        r = self.client.post("/completion", json={**body, "cache_prompt": True, "samplers": ["top_k"]}).json()
        timings = r["timings"]
        return timings["predicted_n"], timings["predicted_per_second"], time.perf_counter() - started

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.terminate()
        self.process.wait(timeout=30)


class Service:
    def __init__(self, data_dir: Path, levers: str):
        os.environ["MLX_LORA_API_LEVERS"] = levers
        # MLX reuses a compiled kernel by name whatever flags built it (accel/jit.py): one cache each
        os.environ["TMPDIR"] = str(data_dir / f"jit-{levers}")
        Path(os.environ["TMPDIR"]).mkdir(exist_ok=True)
        self.port = free_port()
        self.process, _ = start_server(data_dir, self.port, data_dir / f"server-{levers}.log")
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=600)
        self.chat(QUESTION, 4)  # loads the model in the generation process

    def chat(self, messages: list[dict], tokens: int, model: str = MODEL) -> tuple[int, float, float]:
        body = {"model": model, "messages": messages, "max_tokens": tokens, "stream": True}
        started = time.perf_counter()
        first = last = None
        end: dict = {}
        with self.client.stream("POST", "/generate", json=body) as r:
            kind = None
            for line in r.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:") and kind == "text":
                    first = first or time.perf_counter()
                    last = time.perf_counter()
                elif line.startswith("data:") and kind == "end":
                    end = json.loads(line[5:])
        wall = time.perf_counter() - started
        n = end["completion_tokens"]
        decode = (n - 1) / (last - first) if first and last and last > first else float("nan")
        return n, decode, wall

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def export_gguf(data_dir: Path) -> tuple[Path, Path]:
    """The service's float16 export (its own job, on a server started for it), and the same
    weights in float32."""
    os.environ["MLX_LORA_API_LEVERS"] = "on"
    port = free_port()
    process, _ = start_server(data_dir, port, data_dir / "export.log")
    try:
        job = httpx.post(f"http://127.0.0.1:{port}/models/{MODEL}/export", json={"format": "gguf"}).json()
        while (state := httpx.get(f"http://127.0.0.1:{port}/jobs/{job['job_id']}").json())["status"] in (
            "queued",
            "running",
        ):
            time.sleep(0.5)
        assert state["status"] == "success", state
    finally:
        process.terminate()
        process.wait(timeout=60)
    f16 = next((data_dir / "models" / MODEL / "gguf").glob("*.gguf"))
    f32 = data_dir / "f32" / f16.name.replace("-f16", "-f32")
    f32.parent.mkdir()
    code = (
        "import sys, numpy as np\nfrom pathlib import Path\n"
        "from mlx_lora_api.accel import blas; blas.prepare()\n"
        "from mlx_lora_api.tasks import export_gguf as e\n"
        "tensors = e._tensors\n"
        "e._tensors = lambda d, c: {k: v.astype(np.float32) for k, v in tensors(d, c).items()}\n"
        "e.export_gguf(Path(sys.argv[1]), Path(sys.argv[2]), 'f32')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(data_dir / "models" / MODEL), str(f32.parent)], check=True)
    return f16, next(f32.parent.glob("*.gguf"))


def make_adapters(data_dir: Path, count: int) -> list[str]:
    """`count` LoRA adapters of the bundled model in the registry, rank 8 on every projection of
    every block, random weights (a scale small enough to keep the answers readable)."""
    code = (
        "import json, sys, time, mlx.core as mx\n"
        "from pathlib import Path\n"
        "from mlx_lm.utils import load\n"
        "from mlx_lora_api import registry\n"
        "from mlx_lora_api.types import ModelMeta\n"
        "model, _ = load(sys.argv[1])\n"
        "for k, folder in enumerate(sys.argv[2:]):\n"
        "    folder = Path(folder); folder.mkdir(parents=True)\n"
        "    mx.random.seed(k); weights = {}\n"
        "    for name, m in model.named_modules():\n"
        "        if name.endswith(('_proj',)) and hasattr(m, 'weight'):\n"
        "            out, inp = m.weight.shape\n"
        "            weights[name + '.lora_a'] = mx.random.normal((inp, 8)) * 0.02\n"
        "            weights[name + '.lora_b'] = mx.random.normal((8, out)) * 0.02\n"
        "    mx.save_safetensors(str(folder / 'adapters.safetensors'), weights)\n"
        "    config = {'fine_tune_type': 'lora', 'num_layers': len(model.layers),\n"
        "              'lora_parameters': {'rank': 8, 'scale': 2.0, 'dropout': 0.0}}\n"
        "    (folder / 'adapter_config.json').write_text(json.dumps(config))\n"
        f"    registry.write_meta(folder, ModelMeta(kind='adapter', created_at=time.time(), base_model='{MODEL}'))\n"
    )
    names = [f"bench-adapter-{k}" for k in range(count)]
    folders = [str(data_dir / "adapters" / name) for name in names]
    subprocess.run([sys.executable, "-c", code, str(data_dir / "models" / MODEL), *folders], check=True)
    return names


def concurrent(engine, chats: int, models: list[str] | None = None) -> tuple[int, float]:
    """`chats` chats at once (over `models` in turn: the service's adapters)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(chats) as pool:
        if models:
            asks = [(m, models[i % len(models)]) for i, m in enumerate(CHATS[:chats])]
            results = list(pool.map(lambda ask: engine.chat(ask[0], 64, ask[1]), asks))
        else:
            results = list(pool.map(lambda m: engine.chat(m, 64), CHATS[:chats]))
    return sum(r[0] for r in results), time.perf_counter() - started


def adapter_after_adapter(engine, chats: int, models: list[str]) -> tuple[int, float]:
    """Each adapter's share of `chats` at once, one adapter after another."""
    started = time.perf_counter()
    generated = 0
    for k, model in enumerate(models):
        mine = [m for i, m in enumerate(CHATS[:chats]) if i % len(models) == k]
        with ThreadPoolExecutor(len(mine)) as pool:
            generated += sum(r[0] for r in pool.map(lambda m: engine.chat(m, 64, model), mine))
    return generated, time.perf_counter() - started


def sequential(engine, chats: int) -> tuple[int, float]:
    started = time.perf_counter()
    results = [engine.chat(m, 64) for m in CHATS[:chats]]
    return sum(r[0] for r in results), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4, help="0: leave the adapters' rows out")
    args = parser.parse_args()
    data_dir = bundled_data_dir("bench-decode-")
    f16, f32 = export_gguf(data_dir)
    adapters = make_adapters(data_dir, args.adapters) if args.adapters else []
    single: dict[str, list[tuple[int, float, float]]] = {}
    many: dict[str, list[tuple[int, float]]] = {}
    first: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        for name, start in [
            ("service", lambda: Service(data_dir, "on")),
            ("service, float32 weights (no-half_weights)", lambda: Service(data_dir, "no-half_weights")),
            ("service, no prompts kept (no-kept_prompts)", lambda: Service(data_dir, "no-kept_prompts")),
            ("service, MLX's own kernel flags (no-jit_avx2)", lambda: Service(data_dir, "no-jit_avx2")),
            ("service, MLX's own softmax (no-compiled_attention)", lambda: Service(data_dir, "no-compiled_attention")),
            ("service, levers off (sgemm)", lambda: Service(data_dir, "off")),
            ("llama.cpp float16 (the export)", lambda: Llama(f16, args.chats)),
            ("llama.cpp float32", lambda: Llama(f32, args.chats)),
        ]:
            engine = start()
            try:
                first.setdefault(name, []).append(engine.chat(LONG, 1)[2])
                single.setdefault(name, []).append(engine.chat(QUESTION, args.tokens))
                if "levers off" not in name:
                    many.setdefault(f"{name}: {args.chats} at once", []).append(concurrent(engine, args.chats))
                if name == "service":  # batching's own gain
                    many.setdefault(f"service: {args.chats} one after another", []).append(
                        sequential(engine, args.chats)
                    )
                if name == "service" and adapters:
                    over = f"over {len(adapters)} adapters"
                    many.setdefault(f"service: {args.chats} {over}, at once (one batch)", []).append(
                        concurrent(engine, args.chats, adapters)
                    )
                    many.setdefault(f"service: {args.chats} {over}, one adapter's after another's", []).append(
                        adapter_after_adapter(engine, args.chats, adapters)
                    )
            finally:
                engine.close()
            print(f"round {round_ + 1}: {name} done", file=sys.stderr, flush=True)
    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"SmolLM2-135M-Instruct, greedy; medians of {args.rounds} rounds, engines alternating\n")
    print(f"one stream, {args.tokens} tokens | decode tokens/s | wall s")
    print("---|---|---")
    for name, runs in single.items():
        print(f"{name} | {statistics.median(r[1] for r in runs):.1f} | {statistics.median(r[2] for r in runs):.2f}")
    print("\na long prompt (about 780 tokens), its first token | wall s")
    print("---|---")
    for name, runs in first.items():
        print(f"{name} | {statistics.median(runs):.2f}")
    print("\nconcurrent chats, 64 tokens each | tokens/s in all | wall s | tokens (each round)")
    print("---|---|---|---")
    for name, runs in many.items():
        rate = statistics.median(r[0] / r[1] for r in runs)
        tokens = ", ".join(str(r[0]) for r in runs)
        print(f"{name} | {rate:.1f} | {statistics.median(r[1] for r in runs):.2f} | {tokens}")


if __name__ == "__main__":
    main()
