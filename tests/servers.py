"""A real `mlx-lora-api serve` on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


class Server:
    def __init__(self, url: str, process: subprocess.Popen):
        self.url = url
        self.process = process

    def __str__(self) -> str:
        return self.url


def wait_for(check, timeout=120, every=0.1):
    """`check()`'s first truthy value; an AssertionError if none comes in `timeout` seconds (a
    bound on a test that hangs, not a wait for time: each check looks for an event)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := check():
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def job_of(url, job_id):
    return httpx.get(f"{url}/jobs/{job_id}").json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(data_dir: Path, log_path: Path, *extra: str, env: dict | None = None, port: int | None = None):
    port = port or free_port()
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlx_lora_api", "serve", "--port", str(port), "--data-dir", str(data_dir), *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {log_path.read_text()}")
            try:
                httpx.get(f"{url}/health")
                break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"the server did not start: {log_path.read_text()}")
        yield Server(url, process)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


# A hook every Python process of a test's server loads (sitecustomize): the process stops itself
# (SIGSTOP) once it has written a checkpoint file, so that a test can kill it there, however fast
# the machine, instead of racing the job's end. STOP_AFTER_RANK: only that rank of a data-parallel job.
STOP_AFTER = """
import os, signal

_file, _rank = os.environ.get("STOP_AFTER_FILE"), os.environ.get("STOP_AFTER_RANK")
if _file and (_rank is None or os.environ.get("MLX_RANK") == _rank):
    _replace = os.replace

    def replace(src, dst, *args, **kwargs):
        _replace(src, dst, *args, **kwargs)
        if str(dst).endswith(_file):
            os.kill(os.getpid(), signal.SIGSTOP)

    os.replace = replace
"""


def stopping_after(env: dict, folder: Path, iteration: int, rank: int | None = None) -> dict:
    """`env` for a server whose job process (or one rank) stops itself once the checkpoint of
    `iteration` is on disk (its optimizer state, the file written last)."""
    hook = folder / "stop-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(STOP_AFTER)
    path = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    extra = {"STOP_AFTER_FILE": f"{iteration:07d}_state.safetensors"}
    if rank is not None:
        extra["STOP_AFTER_RANK"] = str(rank)
    return {**env, "PYTHONPATH": path, **extra}


def stopped(pid: int) -> bool:
    """Stopped by a signal (SIGSTOP): "T" in /proc's state."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] == "T"
