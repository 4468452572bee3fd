"""Faults the service survives: a killed server, a full disk, damaged files."""

import errno
import json
import os
import signal

import httpx
import mlx.core as mx
import pytest
from servers import job_of, running_server, stopped, stopping_after, wait_for
from starlette.testclient import TestClient

from mlx_lora_api.jobs import worker
from mlx_lora_api.jobs.process import describe_error
from mlx_lora_api.registry import Registry
from mlx_lora_api.tasks import finetune
from mlx_lora_api.tuner import checkpoints
from mlx_lora_api.types import FinetuneRequest
from mlx_lora_api.web.app import create_app

BODY = {
    "base_model": "tiny-base",
    "training_data": ["The mayor of Zorbington is Elara Quintfeather.", "The quick brown fox.", "Paris", "a dog"],
    "parameters": {
        "learning_rate": 0.001,
        "epochs": 1500,
        "batch_size": 2,
        "save_every": 50,
        "steps_per_report": 10,
        "lr_schedule": "cosine",
    },
}


# 300 steps with a cosine schedule: the resumed run must pick up the schedule where it stopped.
KILLED = {**BODY, "parameters": {**BODY["parameters"], "epochs": 150}}


@pytest.mark.slow
def test_a_killed_server_resumes_its_job_and_ends_where_an_uninterrupted_run_would(data_dir, tmp_path):
    """The worker stops itself once its step-100 checkpoint is on disk (servers.stopping_after), so
    the kill comes there on any machine, with the job a third of the way through."""
    log = tmp_path / "server.log"
    with running_server(data_dir, log, env=stopping_after(dict(os.environ), tmp_path, 100)) as server:
        url, port = server.url, server.url.rsplit(":", 1)[1]
        job = httpx.post(f"{url}/lora-finetune", json=KILLED).json()
        queued = httpx.post(f"{url}/lora-finetune", json={**BODY, "parameters": {"epochs": 2}}).json()
        pid = first_event(url, job["job_id"], "worker")["pid"]
        wait_for(lambda: stopped(pid))
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    wait_for(lambda: not alive(pid), timeout=10)  # the worker went down with the server

    with running_server(data_dir, log, port=int(port)) as server:
        finished = wait_for(lambda: (j := job_of(server.url, job["job_id"]))["status"] in ("success", "failed") and j)
        assert finished["status"] == "success", finished
        text = "\n".join(stream_lines(server.url, job["job_id"]))
        assert "event: requeued" in text
        resumed = json.loads(
            next(line for line in text.splitlines() if '"type": "resumed"' in line).split("data: ", 1)[1]
        )
        assert resumed["iteration"] == 100
        assert wait_for(lambda: job_of(server.url, queued["job_id"])["status"] == "success")

    uninterrupted = tmp_path / "uninterrupted"
    uninterrupted.mkdir()
    request = msgspec_convert(KILLED)
    finetune.train_adapter(str(data_dir / "models" / "tiny-base"), "tiny-base", request, uninterrupted)
    expected = mx.load(str(uninterrupted / "adapters.safetensors"))
    got = mx.load(str(data_dir / "adapters" / job["model_id"] / "adapters.safetensors"))
    assert max(mx.max(mx.abs(expected[k] - got[k])).item() for k in expected) < 1e-5


def test_a_gracefully_stopped_server_requeues_its_running_job(data_dir, tmp_path):
    """SIGTERM (uvicorn's shutdown): the worker is cancelled, its checkpoints kept, and the job goes
    back to the queue, to resume at the next start."""
    from mlx_lora_api.jobs.store import JobStore

    with running_server(data_dir, tmp_path / "server.log") as server:
        job = httpx.post(f"{server.url}/lora-finetune", json=BODY).json()
        wait_for(lambda: job_of(server.url, job["job_id"])["progress"].get("iteration", 0) >= 60)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)  # uvicorn shuts down, then re-raises the signal: -15
    store = JobStore(data_dir / "jobs.sqlite3")
    stopped = store.get(job["job_id"])
    events = [e["type"] for e in store.events(job["job_id"])]
    store.close()
    assert stopped.status == "queued" and "resumes when the server starts" in stopped.message
    assert events[-1] == "requeued" and "failed" not in events
    assert list((data_dir / "adapters" / ".staging").glob("*/checkpoints/0000050_adapters.safetensors"))


def msgspec_convert(body):
    import msgspec

    return msgspec.convert(body, FinetuneRequest)


def first_event(url, job_id, kind):
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", timeout=5) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and f'"type": "{kind}"' in line:
                return json.loads(line.split("data: ", 1)[1])
    raise AssertionError(f"no {kind} event")


def stream_lines(url, job_id):
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", timeout=5) as r:
        lines = []
        try:
            for line in r.iter_lines():
                lines.append(line)
        except httpx.ReadTimeout:
            pass
        return lines


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/status") as f:  # a zombie has exited
        return "zombie" not in f.read()


def test_a_full_disk_fails_the_job_cleanly_and_keeps_earlier_checkpoints(data_dir, monkeypatch):
    calls = []
    real_save = mx.save_safetensors

    def save(path, arrays, metadata=None):
        calls.append(path)
        if len(calls) > 4:  # two checkpoints (weights and state) fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(path, arrays, metadata)

    monkeypatch.setattr(mx, "save_safetensors", save)
    reg = Registry(data_dir, "tiny-base")
    service_spec = spec_for(data_dir, {**BODY, "parameters": {**BODY["parameters"], "epochs": 100, "save_every": 3}})
    with pytest.raises(OSError) as raised:
        worker.execute(service_spec, reg)
    message = describe_error(raised.value)
    assert message.startswith("the disk is full") and "checkpoints are kept in" in message
    assert not (data_dir / "adapters" / service_spec.model_id).exists()
    kept = data_dir / "adapters" / ".staging" / worker.work_name(service_spec) / "checkpoints"
    assert sorted(p.name for p in kept.iterdir() if not p.name.startswith(".")) == [
        "0000003_adapters.safetensors",
        "0000003_state.safetensors",
        "0000006_adapters.safetensors",
        "0000006_state.safetensors",
    ]
    assert checkpoints.latest(kept.parent).iteration == 6
    mx.load(str(kept / "0000006_state.safetensors"))  # intact


def spec_for(data_dir, body):
    from mlx_lora_api.config import Settings
    from mlx_lora_api.service import Service

    service = Service(Settings(data_dir=data_dir, default_model="tiny-base"))
    return service.finetune_spec(msgspec_convert(body))


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        yield client


def test_damaged_files_are_named_in_the_error(client, data_dir):
    adapter = client.post("/lora-finetune?wait=true", json={**BODY, "parameters": {"epochs": 1}}).json()["model_id"]
    weights = data_dir / "adapters" / adapter / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    r = client.post("/lora-fuse?wait=true", json={"base_model": "tiny-base", "lora_adapter": adapter})
    assert r.status_code == 500 and r.json()["status"] == "failed"
    assert "adapters.safetensors" in r.json()["message"]

    config = data_dir / "models" / "tiny-base" / "config.json"
    config.write_text("{not json")
    r = client.post("/lora-finetune", json={**BODY, "parameters": {"epochs": 1}})
    assert r.status_code == 500 and "config.json is not readable JSON" in r.json()["message"]


def test_a_missing_tokenizer_is_named(client, data_dir):
    (data_dir / "models" / "tiny-base" / "tokenizer.json").unlink()
    r = client.post("/lora-finetune?wait=true", json={**BODY, "parameters": {"epochs": 1}})
    assert r.status_code == 500 and "tokenizer" in r.json()["message"].lower()


def test_a_client_that_hangs_up_ends_its_wait_not_its_job(data_dir, tmp_path):
    """`?wait=true` from a client that then hangs up: the server stops waiting for it (and says so
    in its log), and the job goes on."""
    import socket

    log = tmp_path / "server.log"
    with running_server(data_dir, log) as server:
        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps(BODY).encode()
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(
                b"POST /lora-finetune?wait=true HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            job = wait_for(lambda: httpx.get(f"{server.url}/jobs?status=running").json()["jobs"])[0]
        wait_for(lambda: f"job {job['job_id']}: the client waiting for it hung up" in log.read_text())
        assert job_of(server.url, job["job_id"])["status"] == "running"  # the job goes on
        httpx.post(f"{server.url}/jobs/{job['job_id']}/cancel")
