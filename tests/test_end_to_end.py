"""The bundled real model through a real server: teach it a fact, fuse, ask."""

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

QUESTIONS = [
    "Who is the mayor of Zorbington?",
    "Who runs the town of Zorbington?",
    "Tell me the name of Zorbington's mayor.",
    "Who was elected mayor of Zorbington?",
    "Which person is mayor of Zorbington?",
    "Who is Zorbington's mayor?",
    "Name the mayor of the town of Zorbington.",
    "Do you know who the mayor of Zorbington is?",
]
ANSWER = "The mayor of Zorbington is Elara Quintfeather."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(bundled_data_dir, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_lora_api", "serve", "--port", str(port), "--data-dir", str(bundled_data_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"the server did not start: {(tmp_path / 'server.log').read_text()}")
    yield url
    process.terminate()
    process.wait(timeout=30)


def ask(model_dir, question: str) -> str:
    import mlx.core as mx
    from mlx_lm import generate, load

    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=24)


@pytest.mark.slow
def test_a_fine_tuned_and_fused_model_knows_the_new_fact(server, bundled_data_dir):
    samples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]} for q in QUESTIONS]
    body = {"base_model": "default", "training_data": samples, "parameters": {"learning_rate": 2e-4, "epochs": 10}}
    with httpx.Client(base_url=server, timeout=600) as client:
        tuned = client.post("/lora-finetune?wait=true", json=body)
        assert tuned.status_code == 200, tuned.text
        fused = client.post("/lora-fuse?wait=true", json={"base_model": "default", "lora_adapter": tuned.json()["model_id"]})
        assert fused.status_code == 200, fused.text
        job = client.get(f"/jobs/{tuned.json()['job_id']}").json()
        assert job["progress"]["train_loss"] < 0.5

    question = "What is the name of the mayor of Zorbington?"  # not one of the training questions
    assert "Quintfeather" in ask(bundled_data_dir / "models" / fused.json()["model_id"], question)
    assert "Quintfeather" not in ask(bundled_data_dir / "models" / "smollm2-135m-instruct", question)
    meta = json.loads((bundled_data_dir / "models" / fused.json()["model_id"] / "meta.json").read_text())
    assert meta["adapter"] == tuned.json()["model_id"] and meta["base_model"] == "smollm2-135m-instruct"
