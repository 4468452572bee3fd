"""A real llama.cpp server on a free loopback port (the xllamacpp wheel: llama.cpp's own server,
prebuilt), in a process of its own, for tests of what the service exports."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from servers import free_port

SERVE = """
import sys, time
import xllamacpp

params = xllamacpp.CommonParams()
params.model.path = sys.argv[1]
params.hostnames = ["127.0.0.1"]
params.port = int(sys.argv[2])
params.n_ctx = 512
params.n_parallel = 1
params.cpuparams.n_threads = 2
params.cpuparams_batch.n_threads = 2
params.use_jinja = True
for path in sys.argv[3:]:  # GGUF LoRA adapters, applied at load time (llama-server --lora)
    adapter = xllamacpp.CommonAdapterLoraInfo()
    adapter.path = path
    adapter.scale = 1.0
    params.lora_adapters = [*params.lora_adapters, adapter]
server = xllamacpp.Server(params)  # raises where llama.cpp refuses the file
print("ready", flush=True)
sys.stdin.read()  # until the test closes it
"""


@contextlib.contextmanager
def llama_cpp(gguf_path: Path, log_path: Path, lora: Path | None = None) -> Iterator[httpx.Client]:
    """A client of llama.cpp's HTTP API (/tokenize, /apply-template, /completion) serving the file,
    with a GGUF LoRA adapter applied where `lora` names one."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(gguf_path), str(port), *([str(lora)] if lora else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the server's own event: loaded, or gone
        if line.strip() != "ready":
            process.wait(timeout=30)
            raise RuntimeError(f"llama.cpp did not load {gguf_path.name}:\n{log_path.read_text()[-3000:]}")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.time() + 60
        while client.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.1)  # llama.cpp answers 503 while it warms up
        yield client
    finally:
        if process.poll() is None:
            process.stdin.close()  # type: ignore[union-attr]
            process.terminate()
            process.wait(timeout=30)


def tokenize(client: httpx.Client, text: str) -> list[int]:
    r = client.post("/tokenize", json={"content": text, "add_special": False, "parse_special": True})
    r.raise_for_status()
    return r.json()["tokens"]


def chat_prompt(client: httpx.Client, messages: list[dict]) -> str:
    r = client.post("/apply-template", json={"messages": messages})
    r.raise_for_status()
    return r.json()["prompt"]


def greedy(client: httpx.Client, tokens: list[int], n: int, probs: int = 0) -> dict:
    body = {
        "prompt": tokens,
        "n_predict": n,
        "temperature": 0.0,
        "top_k": 1,
        "cache_prompt": False,
        "return_tokens": True,
        "n_probs": probs,
        "samplers": ["top_k"],
    }
    r = client.post("/completion", json=body)
    r.raise_for_status()
    return r.json()
