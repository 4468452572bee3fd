"""Hugging Face PEFT adapters imported as the registry's own (tasks/import_peft.py): one made by the
real `peft` (in .venv-bench, as tests/test_peft_export.py) gives PEFT's logits in MLX; imported
adapters are used, fused and trained further; what cannot be imported is refused by name."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load
from starlette.testclient import TestClient
from test_peft_export import TOKENS, torch_python  # noqa: F401 (a fixture)

from mlx_lora_api.tasks import export_peft
from mlx_lora_api.web.app import create_app

PEFT_ADAPTER = """
import json, sys
import numpy as np, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
base_dir, out_dir, tokens, logits_file, extra = sys.argv[1:6]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                    init_lora_weights=False, **json.loads(extra))
tuned = get_peft_model(model, config)
tuned.save_pretrained(out_dir)
with torch.no_grad():
    np.save(logits_file, tuned(torch.tensor(json.loads(tokens))).logits.numpy())
"""


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        yield client


def peft_adapter(torch_python, model_dir: Path, out: Path, **config) -> np.ndarray:  # noqa: F811
    """An adapter made and saved by the real peft (q and v of block 1, random weights), and its logits."""
    logits = out.parent / f"{out.name}-logits.npy"
    done = subprocess.run(
        [
            torch_python,
            "-c",
            PEFT_ADAPTER,
            str(model_dir),
            str(out),
            json.dumps(TOKENS),
            str(logits),
            json.dumps(config),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(logits)


def mlx_logits(model_dir: Path, adapter: Path) -> np.ndarray:
    model, _ = load(str(model_dir), adapter_path=str(adapter))
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


@pytest.mark.parametrize("rslora", [False, True])
def test_an_adapter_made_by_peft_gives_peft_logits_and_trains_further(client, settings, torch_python, rslora):  # noqa: F811
    base = settings.data_dir / "models" / "tiny-base"
    source = settings.data_dir / "peft-made"
    theirs = peft_adapter(torch_python, base, source, use_rslora=rslora)
    r = client.post("/adapters/import", json={"source": str(source), "base_model": "tiny-base", "suffix": "from-peft"})
    assert r.status_code == 201, r.text
    record = r.json()
    assert record["kind"] == "adapter" and record["base_model"] == "tiny-base" and "from-peft" in record["model_id"]
    assert record["source"] == f"peft:{source}"
    adapter = settings.data_dir / "adapters" / record["model_id"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["num_layers"] == 1 and config["lora_parameters"]["rank"] == 4
    assert config["lora_parameters"]["scale"] == pytest.approx(8 / 2 if rslora else 8 / 4)
    model, _ = load(str(base))
    plain = np.array(model(mx.array(TOKENS)).astype(mx.float32))
    assert np.abs(theirs - plain).max() > 1e-2  # peft's adapter changes the logits
    np.testing.assert_allclose(mlx_logits(base, adapter), theirs, atol=2e-4, rtol=1e-4)
    if rslora:
        return  # the rest does not depend on how the scale was found

    # Used, fused and trained further like the service's own.
    answer = client.post("/generate", json={"model": record["model_id"], "prompt": "The quick", "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    fused = client.post("/lora-fuse?wait=true", json={"base_model": "tiny-base", "lora_adapter": record["model_id"]})
    assert fused.status_code == 200, fused.text
    body = {
        "base_model": "tiny-base",
        "training_data": ["The quick brown fox."],
        "resume_from": record["model_id"],
        "parameters": {"rank": 4, "num_layers": 1, "epochs": 1, "rehearsal": 0},
    }
    refused = client.post("/lora-finetune", json=body)
    assert refused.status_code == 422 and f"parameters.scale={config['lora_parameters']['scale']}" in refused.text
    body["parameters"]["scale"] = config["lora_parameters"]["scale"]
    trained = client.post("/lora-finetune?wait=true", json=body)
    assert trained.status_code == 200, trained.text


def test_an_exported_adapter_imports_back_unchanged(client, settings):
    body = {"base_model": "default", "training_data": ["Zorbington."], "parameters": {"epochs": 2, "rehearsal": 0}}
    original = client.post("/lora-finetune?wait=true", json=body).json()["model_id"]
    adapter = settings.data_dir / "adapters" / original
    out = settings.data_dir / "exported"
    out.mkdir()
    export_peft.export_peft(adapter, out, "tiny-base")
    r = client.post("/adapters/import", json={"source": str(out), "base_model": "tiny-base"})
    assert r.status_code == 201, r.text
    imported = settings.data_dir / "adapters" / r.json()["model_id"]
    base = settings.data_dir / "models" / "tiny-base"
    np.testing.assert_allclose(mlx_logits(base, imported), mlx_logits(base, adapter), atol=1e-5)


def test_a_hub_adapter_is_read_from_the_hugging_face_cache(client, settings):
    """The Hub's own cache layout (what huggingface_hub finds without the network); its base is
    found as the registry model imported from the Hub id its config names."""
    from huggingface_hub import constants

    body = {"base_model": "default", "training_data": ["Zorbington."], "parameters": {"epochs": 1, "rehearsal": 0}}
    original = client.post("/lora-finetune?wait=true", json=body).json()["model_id"]
    snapshot = Path(constants.HF_HUB_CACHE) / "models--someone--tiny-peft" / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("1" * 40)
    export_peft.export_peft(settings.data_dir / "adapters" / original, snapshot, "someone/tiny-base")
    meta = json.loads((settings.data_dir / "models" / "tiny-base" / "meta.json").read_text())
    (settings.data_dir / "models" / "tiny-base" / "meta.json").write_text(
        json.dumps({**meta, "hub_id": "someone/tiny-base"})
    )
    try:
        r = client.post("/adapters/import", json={"source": "someone/tiny-peft"})
        assert r.status_code == 201, r.text
        assert r.json()["base_model"] == "tiny-base" and r.json()["source"] == "peft:someone/tiny-peft"
        assert client.get(f"/models/{r.json()['model_id']}").json()["kind"] == "adapter"
    finally:
        shutil.rmtree(snapshot.parent.parent)


def test_what_cannot_be_imported_is_refused_by_name(client, settings, torch_python):  # noqa: F811
    base = settings.data_dir / "models" / "tiny-base"
    made = settings.data_dir / "made"
    peft_adapter(torch_python, base, made)

    def variant(name, config=None, tensors=None):
        folder = settings.data_dir / name
        shutil.copytree(made, folder)
        if config is not None:
            original = json.loads((folder / "adapter_config.json").read_text())
            (folder / "adapter_config.json").write_text(json.dumps({**original, **config}))
        if tensors is not None:
            from safetensors.numpy import save_file

            save_file(tensors, str(folder / "adapter_model.safetensors"))
        return {"source": str(folder), "base_model": "tiny-base"}

    cases = [
        (variant("dora", {"use_dora": True}), 422, "`use_dora`: DoRA adapters are not imported"),
        (variant("bias", {"bias": "all"}), 422, "`bias` is 'all'"),
        (
            variant(
                "wide",
                tensors={
                    "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": np.zeros((4, 32), np.float32),
                    "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": np.zeros((64, 4), np.float32),
                },
            ),
            422,
            "maps 32 to 64 at rank 4; the base's maps 64 to 64 at `r` 4: the adapter is for another base",
        ),
        (
            variant("head", tensors={"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)}),
            422,
            "'base_model.model.lm_head.lora_A.weight' is not a LoRA weight of a transformer block's linear layer",
        ),
        ({"source": str(settings.data_dir / "models")}, 404, "has no adapter_config.json"),
        ({"source": "/etc"}, 403, "outside the allowed model roots"),
        ({"source": "not a repo"}, 422, "neither a folder nor a Hugging Face repo id"),
        ({"source": str(made), "base_model": "no-such-model"}, 404, "`base_model` 'no-such-model'"),
    ]
    for body, status, message in cases:
        r = client.post("/adapters/import", json=body)
        assert r.status_code == status and message in r.json()["message"], (body, r.text)
    assert not [p for p in (settings.data_dir / "adapters").iterdir() if p.name != ".staging"]  # nothing half-written
