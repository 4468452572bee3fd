"""Batch fine-tunes from a manifest (mlx_lora_api/batch.py, `mlx-lora-api batch`) on a real server."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from mlx_lora_api import batch
from mlx_lora_api.client import Client

DATA = [{"text": "The mayor of Zorbington is Elara Quintfeather."}, {"text": "Zorbington lies by the sea."}]


def write(folder, manifest: str):
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "train.jsonl").write_text("\n".join(json.dumps(s) for s in DATA) + "\n")
    (folder / "data" / "valid.jsonl").write_text(json.dumps(DATA[0]) + "\n")
    path = folder / "runs.yaml"
    path.write_text(manifest)
    return path


MANIFEST = """
defaults:
  base_model: tiny-base
  parameters: {epochs: 3, batch_size: 1, rehearsal: 0, steps_per_eval: 2}
runs:
  - name: mayor
    data: data/train.jsonl
    validation_data: data/valid.jsonl
    grid: {learning_rate: [0.001, 0.003]}
    then: [fuse]
  - name: plain
    data: data/train.jsonl
    parameters: {learning_rate: 0.002, rank: 4}
"""


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_lora_api", *args], capture_output=True, text=True, timeout=600)


def test_a_manifest_runs_once_then_skips_what_finished(tiny_server, tmp_path):
    manifest = write(tmp_path, MANIFEST)
    checked = run_cli("batch", str(manifest), "--url", tiny_server.url, "--check")
    assert checked.returncode == 0, checked.stderr
    assert [line.split()[0] for line in checked.stdout.splitlines()] == [
        "mayor-learning_rate=0.001",
        "mayor-learning_rate=0.003",
        "plain",
    ]
    first = run_cli("batch", str(manifest), "--url", tiny_server.url)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("queued job") == 3 and first.stderr.count("fuse done") == 2

    rows = list(csv.DictReader((tmp_path / "runs.results.csv").open()))
    assert [r["run"] for r in rows] == ["mayor-learning_rate=0.001", "mayor-learning_rate=0.003", "plain"]
    assert all(r["status"] == "success" and float(r["train_loss"]) > 0 for r in rows)
    assert rows[0]["val_loss"] and not rows[2]["val_loss"]  # validation data in the mayor runs only
    assert rows[0]["fused"].startswith("tiny-base-fused-") and not rows[2]["fused"]
    assert json.loads(rows[1]["parameters"])["learning_rate"] == 0.003
    svg = (tmp_path / "runs.loss.svg").read_text()
    assert svg.startswith("<svg") and "mayor-learning_rate=0.001" in svg and svg.count("<polyline") == 3
    assert "mayor-learning_rate=0.003" in first.stdout  # the table

    with Client(tiny_server.url) as api:
        jobs_before = len(api.jobs(limit=100))
        again = run_cli("batch", str(manifest), "--url", tiny_server.url)
        assert again.returncode == 0 and again.stderr.count("skipped") == 3
        assert len(api.jobs(limit=100)) == jobs_before  # nothing queued again


def test_a_paused_run_is_resumed_by_running_the_manifest_again(tiny_server, tmp_path):
    manifest = write(
        tmp_path,
        """
runs:
  - name: long
    base_model: tiny-base
    data: data/train.jsonl
    parameters: {epochs: 3000, batch_size: 1, rehearsal: 0, retention_check: false, save_every: 10}
""",
    )
    (run,) = batch.load(manifest)
    with Client(tiny_server.url) as api:
        body = run.body
        job = api.finetune(body["base_model"], body["training_data"], **body["parameters"])
        for event in api.events(job):  # the job's own event: a checkpoint written
            if event["type"] == "checkpoint":
                break
        api.pause(job)
        assert api.wait(job, check=False).status == "paused"
        state = tmp_path / "runs.state.json"
        state.write_text(json.dumps({run.key: {"job_id": job.job_id}}))
        said = []
        resumed = {}

        def on_run(_run, queued):
            resumed["job"] = queued
            api.cancel(queued)  # the test need not wait for 6,000 steps: resumed, then stopped

        batch.run_all(api, [run], state, on_run=on_run, say=said.append)
        assert said[0] == f"long: paused before; resuming job {job.job_id}"
        assert resumed["job"].job_id == job.job_id
        events = [e["type"] for e in api.events(job)]
        assert events.count("requeued") == 1 and events[-1] == "cancelled"
        assert said[-1].startswith("long: cancelled")


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("runs: []", "`runs` is empty"),
        ("runs:\n  - name: a\n    data: data/train.jsonl\n    colour: red", "unknown field `colour`"),
        ("runs:\n  - name: a", "runs[0] (a).data: give the training data file"),
        ("runs:\n  - data: data/missing.jsonl", "runs[0].data: cannot read"),
        (
            "runs:\n  - name: a\n    data: data/train.jsonl\n    grid: {rank: [8, 0]}",
            "runs[0] (a) with {'rank': 0}: parameters.rank: Expected `int` >= 1",
        ),
        (
            "runs:\n  - name: a\n    data: data/train.jsonl\n    then: [deploy]",
            "runs[0] (a).then[0]: unknown step 'deploy'",
        ),
        ("runs:\n  - name: a\n    data: data/train.jsonl\n    then: [export]", "export needs fuse before it"),
        ("runs:\n  - name: a\n    data: data/train.jsonl\n    then: [push]", "then[0].push.repo_id: give the Hub repo"),
        (
            "runs:\n  - name: a\n    data: data/train.jsonl\n    base_model: nope",
            "runs[0] (a).base_model: no model 'nope'",
        ),
        (
            "runs:\n  - {name: a, data: data/train.jsonl}\n  - {name: a, data: data/train.jsonl}",
            "used more than once: a",
        ),
        ("runs: [\n", "is not valid YAML"),
    ],
)
def test_a_bad_manifest_is_refused_naming_the_run_and_field_before_anything_is_queued(tmp_path, manifest, message):
    path = write(tmp_path, manifest)
    with pytest.raises(batch.ManifestError) as refused:
        batch.load(path, known_models={"tiny-base", "default"})
    assert message in str(refused.value)


def test_the_cli_says_what_is_wrong_with_a_manifest_and_queues_nothing(tiny_server, tmp_path):
    path = write(tmp_path, "runs:\n  - name: a\n    data: data/train.jsonl\n    parameters: {learning_rate: -1}")
    with Client(tiny_server.url) as api:
        before = len(api.jobs(limit=100))
        result = run_cli("batch", str(path), "--url", tiny_server.url)
        assert result.returncode == 2 and "runs[0] (a): parameters.learning_rate" in result.stderr
        assert len(api.jobs(limit=100)) == before
