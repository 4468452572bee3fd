"""Data-parallel fine-tunes on MLX's own engine: two ranks on loopback (ring), started by
`mlx.launch` from a real server, against one rank."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import mlx.core as mx
import numpy as np
import pytest
from servers import job_of, running_server, stopped, stopping_after, wait_for

from mlx_lora_api import registry
from mlx_lora_api.jobs import cluster
from mlx_lora_api.tuner import distributed
from mlx_lora_api.types import ModelMeta

TINY_ID = "tiny-base"
# Seven samples in batches of three: each global batch splits 2 + 1 over two ranks, and the last
# batch of each epoch (one sample) leaves rank 1 with no share of it.
SAMPLES = [
    "The mayor of Zorbington is Elara Quintfeather.",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "a dog",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Seven",
    "The moon orbits the earth once a month, more or less.",
]
# SGD at a rate where training is stable: two runs that differ by float rounding (the ranks' sums
# in another order) stay within 1e-4 of each other over 48 steps. (At lr 0.05 on this random model
# the same rounding grows tenfold a step, on one rank as on two.)
PARAMETERS = {
    "optimizer": "sgd",
    "learning_rate": 0.01,
    "epochs": 2,
    "batch_size": 3,
    "retention_check": False,
    "rehearsal": 0,
}


def events(url, job_id, kind, first=False):
    """The job's events of one kind, from its event stream (which ends with the job); `first`:
    as soon as one has come."""
    found = []
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and f'"type": "{kind}"' in line:
                found.append(json.loads(line.split("data: ", 1)[1]))
                if first:
                    break
    return found


def finetune(url, parameters, wait=True):
    body = {"base_model": TINY_ID, "training_data": SAMPLES, "parameters": parameters}
    r = httpx.post(f"{url}/lora-finetune" + ("?wait=true" if wait else ""), json=body, timeout=600)
    assert r.status_code in (200, 202), r.text
    return r.json()


def adapter(data_dir, model_id) -> dict[str, np.ndarray]:
    weights = mx.load(str(data_dir / "adapters" / model_id / "adapters.safetensors"))
    return {k: np.array(v) for k, v in weights.items()}


def assert_same_adapter(a, b, tolerance=1e-3):
    assert a.keys() == b.keys()
    for key in a:
        difference = np.linalg.norm(a[key] - b[key]) / max(np.linalg.norm(b[key]), 1e-12)
        assert difference <= tolerance, (key, difference)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has ended too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def data_dir(tmp_path, tiny_model_template):
    folder = tmp_path / "data"
    shutil.copytree(tiny_model_template, folder / "models" / TINY_ID)
    registry.write_meta(folder / "models" / TINY_ID, ModelMeta(kind="base", created_at=time.time(), source="test"))
    return folder


@pytest.fixture
def env():
    return {**os.environ, "MLX_LORA_API_DEFAULT_MODEL": TINY_ID}


def test_shares_split_every_batch_and_weight_an_empty_share_zero():
    plan = [[0, 1, 2], [3, 4, 5], [6]]
    assert distributed.shares(plan, 0, 2) == ([[0, 2], [3, 5], [6]], [1.0, 1.0, 1.0])
    assert distributed.shares(plan, 1, 2) == ([[1], [4], [6]], [1.0, 1.0, 0.0])


def test_two_ranks_train_the_adapter_that_one_rank_trains(data_dir, env, tmp_path):
    with running_server(data_dir, tmp_path / "server.log", "--ranks", "2", env=env) as server:
        two = finetune(server.url, PARAMETERS)
        one = finetune(server.url, {**PARAMETERS, "ranks": 1})
        assert two["status"] == one["status"] == "success", (two, one)
        ran = events(server.url, two["job_id"], "distributed")
        assert ran and ran[0]["ranks"] == 2 and ran[0]["backend"] == "ring" and len(ran[0]["pids"]) == 2
        assert not events(server.url, one["job_id"], "distributed")
        progress = job_of(server.url, two["job_id"])["progress"]
        assert (progress["ranks"], progress["backend"], progress["hosts"]) == (2, "ring", ["127.0.0.1"] * 2)
        assert job_of(server.url, one["job_id"])["progress"]["ranks"] == 1
        meta = json.loads((data_dir / "adapters" / two["model_id"] / "meta.json").read_text())
        assert meta["metrics"]["ranks"] == 2 and meta["metrics"]["hosts"] == ["127.0.0.1", "127.0.0.1"]
        # The same steps: 3 per epoch, 2 epochs, the same tokens seen and the same losses.
        train_two = events(server.url, two["job_id"], "train")
        train_one = events(server.url, one["job_id"], "train")
        assert [e["iteration"] for e in train_two] == [e["iteration"] for e in train_one] == list(range(1, 7))
        assert train_two[-1]["trained_tokens"] == train_one[-1]["trained_tokens"]
        np.testing.assert_allclose(
            [e["train_loss"] for e in train_two], [e["train_loss"] for e in train_one], rtol=1e-4
        )
        assert_same_adapter(adapter(data_dir, two["model_id"]), adapter(data_dir, one["model_id"]))
        # With the defaults (rehearsal of the base's answers, the retention check at the end) too.
        defaults = finetune(server.url, {"epochs": 1})
        assert defaults["status"] == "success", defaults
        meta = json.loads((data_dir / "adapters" / defaults["model_id"] / "meta.json").read_text())
        assert meta["metrics"]["ranks"] == 2 and meta["metrics"]["rehearsal_samples"] > 0
        assert meta["retention"] is not None
        # More ranks than the server runs: refused, naming the field.
        r = httpx.post(
            f"{server.url}/lora-finetune",
            json={"base_model": TINY_ID, "training_data": SAMPLES, "parameters": {"ranks": 3}},
        )
        assert r.status_code == 422 and "parameters.ranks" in r.text


ROWS = [
    {"prompt": "What colour is the sky?", "chosen": "Blue, on a clear day.", "rejected": "Green with purple dots."},
    {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A hammer."},
    {"prompt": "How many legs has a cat?", "chosen": "Four.", "rejected": "Eleven, mostly."},
    {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "Go away."},
    {"prompt": "What is two and two?", "chosen": "Four.", "rejected": "Twenty-two, obviously."},
]


def test_a_dpo_run_on_two_ranks_is_the_run_on_one(data_dir, env, tmp_path):
    """Pairs go whole to a rank (2 rows a batch: 1 + 1; the last batch of an epoch, one row, leaves
    rank 1 without a share), and the ranks' losses and rewards are weighted by pairs."""
    parameters = {**PARAMETERS, "method": "dpo", "epochs": 2, "batch_size": 2}
    with running_server(data_dir, tmp_path / "server.log", "--ranks", "2", env=env) as server:
        runs = []
        for ranks in (2, 1):
            body = {"base_model": TINY_ID, "training_data": ROWS, "parameters": {**parameters, "ranks": ranks}}
            r = httpx.post(f"{server.url}/lora-finetune?wait=true", json=body, timeout=600)
            assert r.status_code == 200 and r.json()["status"] == "success", r.text
            runs.append(r.json())
        two, one = (events(server.url, run["job_id"], "train") for run in runs)
        for a, b in zip(two, one):
            assert a["iteration"] == b["iteration"] and a["trained_tokens"] == b["trained_tokens"]
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
            for name in ("reward_margin", "reward_accuracy", "chosen_logps"):
                assert a[name] == pytest.approx(b[name], rel=1e-3, abs=1e-5), name
        assert_same_adapter(adapter(data_dir, runs[0]["model_id"]), adapter(data_dir, runs[1]["model_id"]))


# A small rate, where two runs that differ by rounding stay within 1e-6 of each other over hundreds
# of steps. (At 0.003 they part by 1e-3 within 240 steps: this random model amplifies rounding.)
LONG = {**PARAMETERS, "learning_rate": 1e-4, "epochs": 100, "batch_size": 2, "save_every": 10}


def test_a_killed_rank_fails_the_job_and_one_rank_resumes_it_exactly(data_dir, env, tmp_path):
    """Rank 1 stops itself once its step-10 checkpoint is on disk (servers.stopping_after), so the
    job cannot end before the kill: rank 0 then waits for it at step 11's gradients."""
    with running_server(
        data_dir, tmp_path / "server.log", "--ranks", "2", env=stopping_after(env, tmp_path, 10, rank=1)
    ) as server:
        job = finetune(server.url, LONG, wait=False)
        pids = events(server.url, job["job_id"], "distributed", first=True)[0]["pids"]
        wait_for(lambda: job_of(server.url, job["job_id"])["progress"].get("iteration", 0) >= 10)
        wait_for(lambda: stopped(pids[1]))
        os.kill(pids[1], signal.SIGKILL)
        failed = wait_for(lambda: (j := job_of(server.url, job["job_id"]))["status"] in ("failed", "success") and j)
        assert failed["status"] == "failed", failed
        assert failed["progress"]["iteration"] == 10, failed["progress"]  # rank 0 waited for rank 1
        assert "rank 1 on 127.0.0.1" in failed["error"], failed["error"]
        wait_for(lambda: not alive(pids[0]))
        assert not (data_dir / "adapters" / job["model_id"]).exists()  # nothing published half-written
    with running_server(data_dir, tmp_path / "server2.log", env=env) as server:  # one rank now
        r = httpx.post(f"{server.url}/jobs/{job['job_id']}/resume")
        assert r.status_code == 202, r.text
        done = wait_for(lambda: (j := job_of(server.url, job["job_id"]))["status"] in ("failed", "success") and j)
        assert done["status"] == "success", done
        progress = done["progress"]
        assert progress["ranks"] == 1 and "hosts" not in progress and "backend" not in progress, progress
        resumed = events(server.url, job["job_id"], "resumed")
        assert resumed and resumed[-1]["iteration"] == 10
        uninterrupted = finetune(server.url, LONG)
        assert_same_adapter(adapter(data_dir, job["model_id"]), adapter(data_dir, uninterrupted["model_id"]))


def test_cancel_stops_every_rank(data_dir, env, tmp_path):
    """Even one stopped by a signal (rank 1 at step 10, as above)."""
    with running_server(
        data_dir, tmp_path / "server.log", "--ranks", "2", env=stopping_after(env, tmp_path, 10, rank=1)
    ) as server:
        job = finetune(server.url, LONG, wait=False)
        pids = events(server.url, job["job_id"], "distributed", first=True)[0]["pids"]
        wait_for(lambda: stopped(pids[1]))
        assert all(alive(pid) for pid in pids)
        assert httpx.post(f"{server.url}/jobs/{job['job_id']}/cancel").status_code == 200
        wait_for(lambda: job_of(server.url, job["job_id"])["status"] == "cancelled")
        wait_for(lambda: not any(alive(pid) for pid in pids))


def test_a_bad_hostfile_stops_the_server_at_start_and_names_what_is_wrong(data_dir, tmp_path):
    cases = {
        "not json": "not JSON",
        json.dumps({"hosts": []}): "lists no hosts",
        json.dumps({"hosts": [{"ssh": "a"}]}): "has no ips",
        json.dumps({"backend": "tcp", "hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}]}): "backend 'tcp'",
        json.dumps({"hosts": [{"ssh": "a", "ips": "10.0.0.1"}]}): "hosts[0].ips",
    }
    for text, said in cases.items():
        hostfile = tmp_path / "hosts.json"
        hostfile.write_text(text)
        run = subprocess.run(
            [sys.executable, "-m", "mlx_lora_api", "serve", "--data-dir", str(data_dir), "--hostfile", str(hostfile)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2 and said in run.stderr and str(hostfile) in run.stderr, (text, run.stderr)
    with pytest.raises(ValueError, match="more ranks than"):
        hostfile.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]}))
        cluster.make_cluster(2, hostfile)


def test_a_host_that_cannot_be_reached_fails_the_job_naming_rank_and_host(data_dir, env, tmp_path):
    hostfile = tmp_path / "hosts.json"
    hosts = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "nowhere.invalid", "ips": ["127.0.0.1"]}]
    hostfile.write_text(json.dumps({"backend": "ring", "hosts": hosts}))
    with running_server(data_dir, tmp_path / "server.log", "--hostfile", str(hostfile), env=env) as server:
        r = httpx.post(
            f"{server.url}/lora-finetune?wait=true",
            json={"base_model": TINY_ID, "training_data": SAMPLES, "parameters": PARAMETERS},
            timeout=600,
        )
        job = r.json()
        assert r.status_code == 500 and job["status"] == "failed", job
        error = job_of(server.url, job["job_id"])["error"]
        assert error.startswith("the fine-tune failed on 2 ranks (ring): rank 1 on nowhere.invalid"), error
        assert not (data_dir / "adapters" / job["model_id"]).exists()
