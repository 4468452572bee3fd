#!/usr/bin/env python3
"""The API under load while a real fine-tune trains, and its fixed costs.

    .venv/bin/python scripts/bench_api.py [--seconds 60] [--clients 50]

Measures, against a real `mlx-lora-api serve` on a free loopback port and a fresh data folder
with the bundled model imported:
- cold start: from starting the process to its first answer;
- decoding and validating a 10,000-sample fine-tune request (in process, and over HTTP);
- for --seconds while a fine-tune of the bundled model trains: --clients concurrent clients
  polling job status, listing models, and submitting and cancelling small jobs. Latency per
  kind of request (p50, p99), requests per second, and every error (a 5xx, a refused or
  dropped connection, or a status that request should not get);
- --chats concurrent streaming chats (/v1/chat/completions, the bundled model, 32 tokens each)
  while one more client asks /health and GET /jobs every 50 ms: how many chats were answered,
  how many were turned away (429, past MLX_LORA_API_MAX_CONCURRENT_GENERATIONS), and the
  latency of the other requests meanwhile (p50, p99).
Prints a table with the machine and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_lora_api import registry  # noqa: E402
from mlx_lora_api.registry.gguf import register  # noqa: E402
from mlx_lora_api.tasks import import_gguf as gguf_import  # noqa: E402
from mlx_lora_api.types import FinetuneRequest  # noqa: E402

FACT = "The mayor of Zorbington is Elara Quintfeather."
TRAINING = {
    "base_model": "default",
    "training_data": [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}: who is the mayor of Zorbington?"},
                {"role": "assistant", "content": FACT},
            ]
        }
        for i in range(16)
    ],
    "parameters": {"learning_rate": 1e-4, "epochs": 200, "save_every": 1000},
}
# Each client waits this long (uniform, seconds) between requests: ~10 requests a second a
# client, as a UI or script polling a job would; --think 0 0 measures the saturation throughput.
THINK = [0.05, 0.15]
SMALL_JOB = {"base_model": "default", "training_data": ["x"], "parameters": {"epochs": 1}}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        memory = int(Path("/proc/meminfo").read_text().split()[1]) // (1024 * 1024)
    except OSError:
        memory = 0
    return f"{cpu}, {os.cpu_count()} cores, {memory} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundled_data_dir(prefix: str) -> Path:
    """A fresh data folder with the bundled model imported (what `serve` does on a first start)."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    gguf_path = gguf_import.bundled_gguf_path()
    if gguf_path is None:
        raise SystemExit("the bundled model is not installed: run ./scripts/setup")
    register(gguf_path, registry.Registry(data_dir, gguf_import.BUNDLED_NAME), gguf_import.BUNDLED_NAME)
    return data_dir


def start_server(data_dir: Path, port: int, log: Path, *extra: str) -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lora_api",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--log-level",
            "warning",
            *extra,
        ],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return process, time.perf_counter() - started
        except httpx.TransportError:
            if process.poll() is not None:
                raise SystemExit(f"the server exited: {log.read_text()}") from None
            time.sleep(0.01)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Load:
    def __init__(self, url: str, job_id: str):
        self.url = url
        self.job_id = job_id
        self.latency: dict[str, list[float]] = {"status": [], "models": [], "submit": [], "cancel": []}
        self.errors: list[str] = []

    async def timed(self, client: httpx.AsyncClient, kind: str, method: str, path: str, ok: tuple, **kw):
        started = time.perf_counter()
        try:
            response = await client.request(method, path, **kw)
        except httpx.HTTPError as e:
            self.errors.append(f"{kind}: {type(e).__name__}")
            return None
        self.latency[kind].append(time.perf_counter() - started)
        if response.status_code not in ok:
            self.errors.append(f"{kind}: HTTP {response.status_code} {response.text[:120]}")
        return response

    async def client(self, seconds: float, seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.perf_counter() + seconds
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            while time.perf_counter() < deadline:
                roll = rng.random()
                if roll < 0.7:
                    await self.timed(client, "status", "GET", f"/jobs/{self.job_id}", (200,))
                elif roll < 0.9:
                    await self.timed(client, "models", "GET", "/models", (200,))
                else:
                    r = await self.timed(client, "submit", "POST", "/lora-finetune", (202, 429), json=SMALL_JOB)
                    if r is not None and r.status_code == 202:
                        # a job may end (or start) between submit and cancel: 409 is a right answer
                        await self.timed(client, "cancel", "POST", f"/jobs/{r.json()['job_id']}/cancel", (200, 409))
                await asyncio.sleep(rng.uniform(*THINK))

    async def run(self, clients: int, seconds: float) -> float:
        started = time.perf_counter()
        await asyncio.gather(*(self.client(seconds, i) for i in range(clients)))
        return time.perf_counter() - started


async def chats(url: str, n: int, max_tokens: int = 32) -> tuple[dict[int, int], dict[str, list[float]], float]:
    outcomes: dict[int, int] = {}
    latency: dict[str, list[float]] = {"health": [], "jobs": []}
    done = asyncio.Event()
    body = {
        "model": "default",
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.0,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
    }

    async def chat() -> None:
        async with (
            httpx.AsyncClient(base_url=url, timeout=600) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            async for _ in r.aiter_lines():
                pass
            outcomes[r.status_code] = outcomes.get(r.status_code, 0) + 1

    async def poll() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            while not done.is_set():
                for kind, path in (("health", "/health"), ("jobs", "/jobs")):
                    started = time.perf_counter()
                    await client.get(path)
                    latency[kind].append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

    started = time.perf_counter()
    poller = asyncio.create_task(poll())
    await asyncio.gather(*(chat() for _ in range(n)))
    done.set()
    await poller
    return outcomes, latency, time.perf_counter() - started


def decode_cost(n: int = 10_000) -> tuple[float, int]:
    body = {**TRAINING, "training_data": TRAINING["training_data"] * (n // len(TRAINING["training_data"]))}
    raw = msgspec.json.encode(body)
    decoder = msgspec.json.Decoder(FinetuneRequest)
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        decoder.decode(raw)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), len(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--chats", type=int, default=64)
    parser.add_argument(
        "--think",
        type=float,
        nargs=2,
        default=THINK,
        metavar=("MIN", "MAX"),
        help="seconds a client waits between requests (default 0.05 0.15)",
    )
    args = parser.parse_args()
    THINK[:] = args.think

    data_dir = bundled_data_dir("bench-api-")
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process, cold = start_server(data_dir, port, data_dir / "server.log")
        try:
            decode_seconds, decode_bytes = decode_cost()
            big = {**TRAINING, "training_data": TRAINING["training_data"] * 625}
            started = time.perf_counter()
            r = httpx.post(f"{url}/lora-finetune", json=big, timeout=60)
            http_seconds = time.perf_counter() - started
            assert r.status_code == 202, r.text
            httpx.post(f"{url}/jobs/{r.json()['job_id']}/cancel")

            job = httpx.post(f"{url}/lora-finetune", json=TRAINING).json()
            while httpx.get(f"{url}/jobs/{job['job_id']}").json()["progress"].get("iteration", 0) < 1:
                time.sleep(0.2)
            load = Load(url, job["job_id"])
            elapsed = asyncio.run(load.run(args.clients, args.seconds))
            state = httpx.get(f"{url}/jobs/{job['job_id']}").json()
            still_training = state["status"] == "running"
            httpx.post(f"{url}/jobs/{job['job_id']}/cancel")
            httpx.get(f"{url}/health", timeout=120)  # its first call starts a worker probe: not timed
            httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_tokens": 1}, timeout=120)  # model loaded
            chat_outcomes, chat_latency, chat_seconds = asyncio.run(chats(url, args.chats))
        finally:
            process.terminate()
            process.wait(timeout=60)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    total = sum(len(v) for v in load.latency.values())
    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| cold start of `serve` to its first answer | {cold * 1000:.0f} ms |")
    print(
        f"| decode + validate a 10,000-sample fine-tune request ({decode_bytes / 1e6:.1f} MB), in process | "
        f"{decode_seconds * 1000:.1f} ms |"
    )
    print(f"| the same request over HTTP to its 202 | {http_seconds * 1000:.0f} ms |")
    print(
        f"| load: {args.clients} clients, {args.think[0]}-{args.think[1]} s between requests, for {elapsed:.0f} s while a fine-tune trains "
        f"(still training at the end: {'yes' if still_training else 'no'}) | {total} requests, {total / elapsed:.0f} req/s |"
    )
    for kind, values in load.latency.items():
        print(
            f"| {kind} latency p50 / p99 ({len(values)} requests) | "
            f"{percentile(values, 50) * 1000:.1f} ms / {percentile(values, 99) * 1000:.1f} ms |"
        )
    print(f"| errors | {len(load.errors)} |")
    answered = chat_outcomes.get(200, 0)
    others = ", ".join(f"{n} x {code}" for code, n in sorted(chat_outcomes.items()) if code != 200) or "none"
    print(
        f"| {args.chats} concurrent streaming chats of 32 tokens: answered / other answers / seconds | "
        f"{answered} / {others} / {chat_seconds:.1f} s |"
    )
    for kind, values in chat_latency.items():
        print(
            f"| meanwhile GET /{kind} latency p50 / p99 ({len(values)} requests) | "
            f"{percentile(values, 50) * 1000:.1f} ms / {percentile(values, 99) * 1000:.1f} ms |"
        )
    for error in sorted(set(load.errors))[:10]:
        print(f"|   {error} | {load.errors.count(error)} |")


if __name__ == "__main__":
    main()
