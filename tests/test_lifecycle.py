"""Quantize, export to GGUF, push to the Hub: the model operations that run as jobs."""

import json
import shutil
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import generate
from mlx_lm.utils import load
from starlette.testclient import TestClient

from mlx_lora_api import registry
from mlx_lora_api.registry import hub
from mlx_lora_api.tasks import import_gguf as gguf_import
from mlx_lora_api.types import ModelMeta, PushRequest
from mlx_lora_api.web.app import create_app

TOKEN = "hf_test_secret_token_0123456789"


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        yield client


def wait_job(client, job_id, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("success", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end")


def run(client, path, body=None):
    r = client.post(path, json=body or {})
    assert r.status_code == 202, r.text
    return r.json()["model_id"], wait_job(client, r.json()["job_id"])


def test_quantize_then_qlora_then_fuse_dequantized(client, data_dir):
    quantized, job = run(client, "/models/tiny-base/quantize", {"bits": 4, "group_size": 32})
    assert job["status"] == "success", job
    assert "-q4-" in quantized
    record = client.get(f"/models/{quantized}").json()
    assert record["quantization"]["bits"] == 4 and record["quantization"]["bits_per_weight"] < 8  # from 32
    config = json.loads((data_dir / "models" / quantized / "config.json").read_text())
    assert config["quantization"]["bits"] == 4

    body = {
        "base_model": quantized,
        "training_data": ["The mayor of Zorbington is Elara Quintfeather."],
        "parameters": {"learning_rate": 0.005, "epochs": 10},
    }
    tuned = client.post("/lora-finetune?wait=true", json=body).json()
    assert tuned["status"] == "success", tuned
    job = client.get(f"/jobs/{tuned['job_id']}").json()
    assert (
        job["progress"]["train_loss"] < client.get(f"/jobs/{tuned['job_id']}/metrics").json()["train"][0]["train_loss"]
    )

    # Generation with the QLoRA adapter over its quantized base (laid beside any others, tasks/mixing.py):
    # mlx-lm's own greedy answer with the adapter loaded.
    answer = client.post("/generate", json={"model": tuned["model_id"], "prompt": "The mayor of", "max_tokens": 8})
    assert answer.status_code == 200, answer.text
    reference, tokenizer = load(
        str(data_dir / "models" / quantized), adapter_path=str(data_dir / "adapters" / tuned["model_id"])
    )
    want = generate(reference, tokenizer, tokenizer.encode("The mayor of"), max_tokens=8)
    assert answer.json()["text"] == want
    bare = client.post("/generate", json={"model": quantized, "prompt": "The mayor of", "max_tokens": 8}).json()
    assert bare["text"] != want  # the adapter is in the answer

    requantized = client.post("/lora-fuse?wait=true", json={"base_model": quantized, "lora_adapter": tuned["model_id"]})
    assert requantized.status_code == 500 and "fuse with dequantize" in requantized.json()["message"]
    fused = client.post(
        "/lora-fuse?wait=true", json={"base_model": quantized, "lora_adapter": tuned["model_id"], "dequantize": True}
    ).json()
    assert fused["status"] == "success", fused
    fused_dir = data_dir / "models" / fused["model_id"]
    assert "quantization" not in json.loads((fused_dir / "config.json").read_text())
    base, tokenizer = load(
        str(data_dir / "models" / quantized), adapter_path=str(data_dir / "adapters" / tuned["model_id"])
    )
    tokens = mx.array([tokenizer.encode("The mayor of Zorbington")])
    assert mx.allclose(load(str(fused_dir))[0](tokens), base(tokens), atol=1e-3).item()

    r = client.post(f"/models/{quantized}/quantize", json={"bits": 8})
    assert r.status_code == 422 and "already quantized" in r.json()["message"]
    r = client.post(f"/models/{quantized}/export", json={"format": "gguf"})
    assert r.status_code == 422 and "quantized" in r.json()["message"]


def test_export_gguf_round_trips_through_the_importer(client, data_dir, tmp_path):
    _, job = run(client, "/models/tiny-base/export", {"format": "gguf"})
    assert job["status"] == "success", job
    folder = data_dir / "models" / "tiny-base" / "gguf"
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "tiny-base-f16.gguf"]
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-base-f16.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile

    gguf_import.import_gguf(folder / "tiny-base-f16.gguf", tmp_path / "back")
    original, tokenizer = load(str(data_dir / "models" / "tiny-base"))
    back, back_tokenizer = load(str(tmp_path / "back"))
    back.set_dtype(mx.float32)
    text = "The mayor of Zorbington is 42."
    assert back_tokenizer.encode(text) == tokenizer.encode(text)
    tokens = mx.array([tokenizer.encode(text)])
    assert mx.max(mx.abs(original(tokens) - back(tokens))).item() < 2e-2  # float16 in the file


def test_export_refuses_what_gguf_cannot_hold(client, data_dir):
    other = data_dir / "models" / "not-llama"
    shutil.copytree(data_dir / "models" / "tiny-base", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    r = client.post("/models/not-llama/export", json={"format": "gguf"})
    assert r.status_code == 422 and "'qwen2'" in r.json()["message"]
    body = {"base_model": "default", "training_data": ["x y"], "parameters": {"fine_tune_type": "dora"}}
    adapter = client.post("/lora-finetune?wait=true", json=body).json()
    r = client.post(f"/models/{adapter['model_id']}/export", json={})  # a LoRA adapter exports as a GGUF LoRA
    assert r.status_code == 422 and "dora adapter; gguf export handles LoRA adapters" in r.json()["message"]
    assert "fuse it" in r.json()["message"]
    assert client.post("/models/nothing/export", json={}).status_code == 404
    assert client.post("/models/tiny-base/export", json={"format": "onnx"}).status_code == 422


def test_push_needs_a_token_and_a_valid_repo_id(client, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    r = client.post("/models/tiny-base/push", json={"repo_id": "someone/tiny"})
    assert r.status_code == 503 and "this server has no Hugging Face token" in r.json()["message"]  # was 401
    assert "HF_TOKEN" in r.json()["message"] and "www-authenticate" not in r.headers
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    r = client.post("/models/tiny-base/push", json={"repo_id": "not//valid"})
    assert r.status_code == 422 and "`repo_id`" in r.json()["message"]
    assert client.post("/models/nothing/push", json={"repo_id": "someone/tiny"}).status_code == 404


def test_a_failed_push_never_shows_the_token(client, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the stand-in Hub (a closed port) cannot be reached
    r = client.post("/models/tiny-base/push", json={"repo_id": "someone/tiny", "private": True})
    assert r.status_code == 202
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "failed" and job["error"]
    everything = json.dumps(job) + client.get(f"/jobs/{job['job_id']}/events").text
    assert TOKEN not in everything


class RecordingHub:
    """HfApi's two calls, recorded with the exact files an upload_folder would send."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
        from huggingface_hub.utils import filter_repo_objects

        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        sent = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        card = (Path(folder_path) / "README.md").read_text()
        self.calls.append(("upload_folder", repo_id, commit_message, sent, card))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def test_push_uploads_the_model_files_and_a_model_card(client, data_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    registry.write_meta(
        data_dir / "models" / "tiny-base",
        ModelMeta(kind="base", created_at=1.0, hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0"),
    )
    body = {
        "base_model": "default",
        "training_data": ["The mayor of Zorbington is Elara Quintfeather."],
        "validation_data": ["Zorbington"],
        "parameters": {"epochs": 2, "save_every": 1},
    }
    adapter = client.post("/lora-finetune?wait=true", json=body).json()["model_id"]
    fused = client.post("/lora-fuse?wait=true", json={"base_model": "default", "lora_adapter": adapter}).json()[
        "model_id"
    ]
    service = client.app.state.service
    for model_id, expected_files in [
        (
            fused,
            {
                "README.md",
                "config.json",
                "model.safetensors",
                "model.safetensors.index.json",
                "tokenizer.json",
                "tokenizer_config.json",
            },
        ),
        (adapter, {"README.md", "adapter_config.json", "adapters.safetensors"}),
    ]:
        spec = service.push_spec(model_id, PushRequest(repo_id="me/zorb"))
        fake = RecordingHub()
        url = hub.push(Path(spec.base.path), spec.request.repo_id, spec.request.private, "Upload", spec.card, api=fake)
        assert url == "https://huggingface.co/me/zorb/commit/abc"
        assert fake.calls[0] == ("create_repo", "me/zorb", True, True)
        _, repo, message, files, card = fake.calls[1]
        assert expected_files <= set(files) and not any(f.startswith(("checkpoints", "meta.json")) for f in files)
        from huggingface_hub import ModelCard

        assert ModelCard(card).data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub's own reading
        header = card.split("---")[1]
        assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in header
        assert "library_name: mlx" in header and "license: apache-2.0" in header and "- mlx" in header
        assert f"`{adapter}` (adapter)" in card and "| epochs | 2 |" in card and "final_train_loss" in card
        assert "## Retention" in card and " of 24 answers unchanged" in card
        assert "Data: 1 samples (text), 1 for validation, sha256" in card
