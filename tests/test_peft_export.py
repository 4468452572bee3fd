"""Adapters exported as Hugging Face PEFT folders, loaded by the real `peft` over the real
`transformers` base (CPU torch, in .venv-bench: `./scripts/setup --for-tests` makes it, as
scripts/bench_train.py --install-torch does), give the logits that MLX gives with the adapter."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load
from starlette.testclient import TestClient

from mlx_lora_api.tasks import export_peft, finetune
from mlx_lora_api.tasks.gguf_metadata import ExportError
from mlx_lora_api.types import FinetuneRequest, Parameters
from mlx_lora_api.web.app import create_app

ROOT = Path(__file__).resolve().parent.parent
TORCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
TOKENS = [[5, 17, 42, 99, 3, 250, 7, 64, 12, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]

PEFT_LOGITS = """
import json, sys
import numpy as np, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base_dir, peft_dir, tokens, out = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
ids = torch.tensor(json.loads(tokens))
with torch.no_grad():
    base = model(ids).logits.numpy()
    tuned = PeftModel.from_pretrained(model, peft_dir)
    with_adapter = tuned(ids).logits.numpy()
np.savez(out, base=base, tuned=with_adapter)
"""


@pytest.fixture(scope="module")
def torch_python() -> str:
    if not TORCH_PYTHON.exists():
        pytest.skip("no .venv-bench with torch, transformers and peft: ./scripts/setup --for-tests makes it")
    return str(TORCH_PYTHON)


def trained_adapter(tmp_path, model_dir, **parameters) -> Path:
    out = tmp_path / "adapter"
    out.mkdir()
    request = FinetuneRequest(
        base_model="tiny-base",
        training_data=["The mayor of Zorbington is Elara Quintfeather.", "The quick brown fox."],
        parameters=Parameters(
            learning_rate=1e-2,
            epochs=4,
            batch_size=1,
            rank=4,
            alpha=8,
            retention_check=False,
            rehearsal=0,
            **parameters,
        ),
    )
    finetune.train_adapter(str(model_dir), "tiny-base", request, out)
    return out


def peft_logits(torch_python: str, model_dir: Path, peft_dir: Path, tmp_path: Path) -> dict[str, np.ndarray]:
    out = tmp_path / "peft-logits.npz"
    done = subprocess.run(
        [torch_python, "-c", PEFT_LOGITS, str(model_dir), str(peft_dir), json.dumps(TOKENS), str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.parametrize("num_layers", [2, 1])
def test_peft_loads_the_export_and_gives_mlxs_logits(tmp_path, tiny_model_template, torch_python, num_layers):
    adapter = trained_adapter(tmp_path, tiny_model_template, num_layers=num_layers)
    out = tmp_path / "peft"
    out.mkdir()
    written = export_peft.export_peft(adapter, out, "tiny-base")
    assert written["layers"] == num_layers and "q_proj" in written["target_modules"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"

    model, _ = load(str(tiny_model_template), adapter_path=str(adapter))
    ours = np.array(model(mx.array(TOKENS)).astype(mx.float32))
    theirs = peft_logits(torch_python, tiny_model_template, out, tmp_path)
    assert np.abs(theirs["tuned"] - theirs["base"]).max() > 1e-2  # the adapter changes the logits
    # float32 through different kernels: 2.9e-4 at most apart on a Zen 4 with AVX-512 (logits up to 3.4)
    np.testing.assert_allclose(theirs["tuned"], ours, atol=5e-4, rtol=1e-4)


def test_what_peft_cannot_hold_is_refused_by_name(tmp_path, tiny_model_template):
    dora = trained_adapter(tmp_path, tiny_model_template, fine_tune_type="dora")
    with pytest.raises(ExportError, match="PEFT export handles LoRA adapters; this one is dora"):
        export_peft.export_peft(dora, tmp_path, "tiny-base")
    with pytest.raises(ExportError, match=r"'lm_head\.lora_a' is not one"):
        export_peft.peft_tensors({"lm_head.lora_a": mx.zeros((4, 4))})


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        yield client


def finished(client, job_id):
    """The job once it has ended, followed through its own event stream."""
    with client.stream("GET", f"/jobs/{job_id}/events") as events:
        for line in events.iter_lines():
            if line.startswith("event: ") and line[7:] in ("success", "failed", "cancelled"):
                break
    return client.get(f"/jobs/{job_id}").json()


def test_an_adapter_exports_as_peft_and_as_gguf_lora_through_the_api(client, settings):
    body = {"base_model": "default", "training_data": ["Zorbington."], "parameters": {"epochs": 1, "rehearsal": 0}}
    adapter = client.post("/lora-finetune?wait=true", json=body).json()["model_id"]
    base_refused = client.post("/models/tiny-base/export", json={"format": "peft"})
    assert base_refused.status_code == 422 and "PEFT export is for adapters" in base_refused.json()["message"]
    for format, folder, files in (
        ("peft", "peft", ["adapter_config.json", "adapter_model.safetensors"]),
        ("gguf", "gguf", [f"{adapter}-lora-f32.gguf"]),
    ):
        queued = client.post(f"/models/{adapter}/export", json={"format": format})
        assert queued.status_code == 202, queued.text
        job = finished(client, queued.json()["job_id"])
        assert job["status"] == "success", job
        written = settings.data_dir / "adapters" / adapter / folder
        assert sorted(p.name for p in written.iterdir()) == files
    assert "GGUF LoRA adapter" in job["message"] and "--lora" in job["message"]
    config = json.loads((settings.data_dir / "adapters" / adapter / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-base"
