"""Knowing before a run (jobs/estimate.py): the tokens as training sees them, the steps the job will
take, a refusal where the peak memory would not fit (unless forced), and a rate refreshed by the
fine-tunes that finish."""

from __future__ import annotations

import json

import msgspec
import pytest
from mlx_lm.utils import load
from starlette.testclient import TestClient

from mlx_lora_api.jobs import estimate
from mlx_lora_api.tuner import datasets, preference
from mlx_lora_api.types import Sample
from mlx_lora_api.web.app import create_app

CHAT = [
    {"messages": [{"role": "user", "content": f"Who is the mayor? ({i})"}, {"role": "assistant", "content": "Elara."}]}
    for i in range(6)
]
FORMS = {
    "text": ["The mayor of Zorbington is Elara Quintfeather.", "The quick brown fox."],
    "chat": CHAT[:2],
    "completions": [{"prompt": "Who is the mayor?", "completion": "Elara Quintfeather."}],
    "preference": [
        {"prompt": "Say hello.", "chosen": "Hello there, friend!", "rejected": "No.", "system": "Be kind."},
        {
            "input": {"messages": [{"role": "user", "content": "Name a fruit."}]},
            "preferred_output": [{"role": "assistant", "content": "An apple."}],
            "non_preferred_output": [{"role": "assistant", "content": "A hammer, of course."}],
        },
    ],
}


@pytest.mark.parametrize("form", FORMS)
def test_tokens_are_counted_as_training_tokenizes_them(tiny_model_template, form):
    from transformers import AutoTokenizer

    samples = [s if isinstance(s, str) else msgspec.convert(s, Sample) for s in FORMS[form]]
    _, tokenizer = load(str(tiny_model_template))
    if form == "preference":
        expected = preference.Pairs(samples, tokenizer).lengths()
    else:
        expected = datasets.item_lengths(datasets.build(samples, tokenizer))
    counted = estimate.sample_lengths(samples, AutoTokenizer.from_pretrained(str(tiny_model_template)))
    assert counted == expected


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        yield client


def test_the_check_reports_what_the_job_then_does_and_the_rate_is_refreshed(client, settings):
    body = {
        "base_model": "default",
        "training_data": CHAT,
        "validation_data": CHAT[:2],
        "parameters": {"epochs": 2, "batch_size": 4, "max_seq_length": 16, "rehearsal": 0},
    }
    rehearsing = client.post("/datasets/check", json={**body, "parameters": {**body["parameters"], "rehearsal": 0.5}})
    assert rehearsing.json()["rehearsal_samples"] == 3 and rehearsing.json()["steps"] == 6  # 9 rows by 4, twice
    r = client.post("/datasets/check", json=body)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["format"] == "chat" and report["samples"] == 6 and report["validation_samples"] == 2
    assert report["rehearsal_samples"] == 0 and report["steps"] == 4
    assert report["truncated"] == 6 and report["longest"] > 16 and "truncated" in report["notes"][0]
    assert report["fits"] and report["estimated_peak_memory_bytes"] < report["memory_bytes"]
    assert report["estimated_seconds"] > 0 and "measured matmul rate" in report["rate_source"]

    done = client.post("/lora-finetune?wait=true", json=body)
    assert done.status_code == 200, done.text
    job = client.get(f"/jobs/{done.json()['job_id']}").json()
    assert job["progress"]["total_iterations"] == report["steps"]
    events = client.get(f"/jobs/{job['job_id']}/events").text
    line = next(line for line in events.splitlines() if '"type": "estimate"' in line)
    figures = json.loads(line.removeprefix("data: "))
    assert figures["estimated_seconds"] == report["estimated_seconds"] and figures["peak_memory_bytes"] > 0

    again = client.post("/datasets/check", json=body).json()
    assert "finished on this machine (cpu)" in again["rate_source"]
    assert (settings.data_dir / "calibration.json").is_file()


def test_a_job_over_the_machines_memory_is_refused_with_the_figures_unless_forced(settings):
    settings = msgspec.structs.replace(settings, memory_limit=64 << 20)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        body = {"base_model": "default", "training_data": CHAT, "parameters": {"rehearsal": 0}}
        refused = client.post("/lora-finetune", json=body)
        assert refused.status_code == 422
        message = refused.json()["message"]
        assert "GiB at its peak and the machine has 0.1 GiB" in message and "`force`: true" in message
        assert client.get("/jobs").json()["jobs"] == []  # nothing queued
        assert client.post("/datasets/check", json=body).json()["fits"] is False
        forced = client.post("/lora-finetune", json={**body, "force": True})
        assert forced.status_code == 202, forced.text


def test_a_check_names_what_is_wrong_as_a_fine_tune_does(client):
    r = client.post("/datasets/check", json={"base_model": "default", "training_data": ["x", {"prompt": "y"}]})
    assert r.status_code == 422 and "training_data[1]" in r.json()["message"]
    r = client.post("/datasets/check", json={"base_model": "no-such-model", "training_data": ["x"]})
    assert r.status_code == 404 and "no-such-model" in r.json()["message"]


def test_auto_values_follow_the_rules_openais_api_has_here(client):
    body = {
        "base_model": "default",
        "training_data": ["one sample", "two samples"] * 5,
        "parameters": {"epochs": "auto", "learning_rate": "auto", "batch_size": "auto", "rehearsal": 0},
    }
    report = client.post("/datasets/check", json=body).json()
    assert report["epochs"] == 10 and report["steps"] == 30  # 10 samples: 100 // 10 epochs, batches of 4
    done = client.post("/lora-finetune?wait=true", json=body)
    assert done.status_code == 200, done.text
    parameters = client.get(f"/jobs/{done.json()['job_id']}").json()["parameters"]
    assert (parameters["epochs"], parameters["learning_rate"], parameters["batch_size"]) == (10, 1e-4, 4)
    bad = client.post("/lora-finetune", json={**body, "parameters": {"epochs": "many"}})
    assert bad.status_code == 422 and "parameters.epochs" in bad.json()["message"]


def test_the_default_models_tokenizer_is_loaded_at_start_not_at_the_first_request(settings, monkeypatch):
    """Where torch is installed, transformers imports it with the first tokenizer: 3 to 5 s that
    the first POST /lora-finetune waited for (a 5-s client timeout hit it on a CUDA machine)."""
    import threading

    from mlx_lora_api.service import Service

    loaded: list[str] = []
    done = threading.Event()
    get = estimate.Tokenizers.get

    def recording(self, folder):
        tokenizer = get(self, folder)
        loaded.append(folder)
        done.set()
        return tokenizer

    monkeypatch.setattr(estimate.Tokenizers, "get", recording)
    service = Service(settings)
    with TestClient(create_app(settings, service), base_url="http://127.0.0.1:8000"):
        assert done.wait(120), "the tokenizer was not loaded"
        assert loaded == [str(settings.data_dir / "models" / "tiny-base")]
        assert service.tokenizers.get(loaded[0]) is service.tokenizers.get(loaded[0])  # kept, not loaded again
