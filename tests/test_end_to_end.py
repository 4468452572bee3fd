"""The bundled real model through a real server: teach it a fact, fuse, ask."""

import json

import httpx
import pytest
from llama_cpp import greedy, llama_cpp
from mlx_lm.utils import load
from servers import running_server

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


@pytest.fixture
def server(bundled_data_dir, tmp_path):
    with running_server(bundled_data_dir, tmp_path / "server.log") as server:
        yield server.url


def ask(model_dir, question: str) -> str:
    import mlx.core as mx
    from mlx_lm import generate, load

    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=24)


@pytest.mark.slow
def test_a_fine_tuned_and_fused_model_knows_the_new_fact(server, bundled_data_dir, tmp_path):
    samples = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]} for q in QUESTIONS
    ]
    body = {"base_model": "default", "training_data": samples, "parameters": {"learning_rate": 2e-4, "epochs": 10}}
    with httpx.Client(base_url=server, timeout=600) as client:
        tuned = client.post("/lora-finetune?wait=true", json=body)
        assert tuned.status_code == 200, tuned.text
        fused = client.post(
            "/lora-fuse?wait=true", json={"base_model": "default", "lora_adapter": tuned.json()["model_id"]}
        )
        assert fused.status_code == 200, fused.text
        job = client.get(f"/jobs/{tuned.json()['job_id']}").json()
        assert job["progress"]["train_loss"] < 0.5

        # Before fusing, try the adapter against its base through the API.
        ask_api = {
            "messages": [{"role": "user", "content": "What is the name of the mayor of Zorbington?"}],
            "max_tokens": 24,
        }
        with_adapter = client.post("/generate", json={**ask_api, "model": tuned.json()["model_id"]}).json()
        without = client.post("/generate", json={**ask_api, "model": "default"}).json()
        assert "Quintfeather" in with_adapter["text"] and "Quintfeather" not in without["text"]

    question = "What is the name of the mayor of Zorbington?"  # not one of the training questions
    assert "Quintfeather" in ask(bundled_data_dir / "models" / fused.json()["model_id"], question)
    assert "Quintfeather" not in ask(bundled_data_dir / "models" / "smollm2-135m-instruct", question)
    meta = json.loads((bundled_data_dir / "models" / fused.json()["model_id"] / "meta.json").read_text())
    assert meta["adapter"] == tuned.json()["model_id"] and meta["base_model"] == "smollm2-135m-instruct"

    # The fused model, exported, in a real llama.cpp: it knows the fact, and says it as the service does.
    fused_id = fused.json()["model_id"]
    messages = [{"role": "user", "content": question}]
    with httpx.Client(base_url=server, timeout=600) as client:
        job = client.post(f"/models/{fused_id}/export", json={"format": "gguf"}).json()["job_id"]
        for event in events(client, job):  # the job's own stream, to its end
            last = event
        assert last["type"] == "success", last
        ours = client.post("/generate", json={"model": fused_id, "messages": messages, "max_tokens": 16}).json()
    gguf_file = bundled_data_dir / "models" / fused_id / "gguf" / f"{fused_id}-f16.gguf"
    _, tokenizer = load(str(bundled_data_dir / "models" / fused_id))
    with llama_cpp(gguf_file, tmp_path / "llama.log") as llama:
        theirs = greedy(llama, tokenizer.apply_chat_template(messages, add_generation_prompt=True), 16)
    assert "Quintfeather" in theirs["content"] and theirs["content"] == ours["text"]


def events(client, job_id: str):
    with client.stream("GET", f"/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                yield json.loads(line[6:])
