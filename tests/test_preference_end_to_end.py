"""DPO and ORPO end to end on the bundled SmolLM2-135M-Instruct through a real server: a small
preference set (answers that greet like a pirate, over the same answers plain) raises the reward
accuracy on held-out questions above chance. scripts/bench_preference.py runs the same data to
compare their speed and memory with SFT's."""

from __future__ import annotations

import httpx
import pytest
from servers import running_server

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "A week has seven days."),
    ("What colour is grass?", "Grass is green."),
    ("What do bees make?", "Bees make honey."),
    ("What is two plus two?", "Two plus two is four."),
    ("Which animal barks?", "Dogs bark."),
    ("What is ice made of?", "Ice is frozen water."),
    ("Where does the sun rise?", "The sun rises in the east."),
    ("What do cows drink?", "Cows drink water."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What do you use to write on paper?", "You write on paper with a pen or a pencil."),
    ("Which planet do we live on?", "We live on Earth."),
    ("What falls from clouds when it rains?", "Rain is water falling from the clouds."),
    ("What is the largest ocean?", "The largest ocean is the Pacific."),
    ("What do plants need to grow?", "Plants need light, water and soil."),
    ("How many hours are in a day?", "A day has twenty-four hours."),
    ("What is a baby cat called?", "A baby cat is called a kitten."),
    ("What do you wear on your feet?", "You wear shoes on your feet."),
    ("Which season comes after winter?", "Spring comes after winter."),
    ("What is the colour of the sky on a clear day?", "The sky is blue on a clear day."),
    ("What do fish live in?", "Fish live in water."),
    ("How many months are in a year?", "A year has twelve months."),
    ("What is the freezing point of water in Celsius?", "Water freezes at zero degrees Celsius."),
    # held out: the validation rows
    ("What do birds use to fly?", "Birds fly with their wings."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("What do you call frozen rain?", "Frozen rain is called hail or sleet."),
    ("Which animal gives us wool?", "Sheep give us wool."),
    ("What is the colour of snow?", "Snow is white."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("How many minutes are in an hour?", "An hour has sixty minutes."),
]
HELD_OUT = 8


def preference_rows() -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): the pirate's greeting is chosen, the plain answer rejected."""
    rows = [{"prompt": q, "chosen": f"Ahoy, matey! {a}", "rejected": a} for q, a in QA]
    return rows[:-HELD_OUT], rows[-HELD_OUT:]


def request(method: str, **parameters) -> dict:
    train, held_out = preference_rows()
    return {
        "base_model": "default",
        "training_data": train,
        "validation_data": held_out,
        "parameters": {
            "method": method,
            "learning_rate": 1e-4,
            "epochs": 1,
            "batch_size": 4,
            "num_layers": 8,
            "steps_per_eval": 3,
            "retention_check": False,  # measured elsewhere; a minute for the base's answers
            **parameters,
        },
    }


@pytest.fixture(scope="module")
def server(bundled_data_dir, tmp_path_factory):
    with running_server(bundled_data_dir, tmp_path_factory.mktemp("logs") / "server.log") as server:
        yield server.url


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_tuning_raises_held_out_reward_accuracy_above_chance(server, method):
    with httpx.Client(base_url=server, timeout=900) as client:
        done = client.post("/lora-finetune?wait=true", json=request(method))
        assert done.status_code == 200, done.text
        job_id, model_id = done.json()["job_id"], done.json()["model_id"]
        metrics = client.get(f"/jobs/{job_id}/metrics").json()
        first, last = metrics["validation"][0], metrics["validation"][-1]
        assert first["iteration"] == 0 and last["iteration"] == 6
        assert first["val_reward_accuracy"] <= 0.5  # the base does not prefer the pirate's answers
        assert last["val_reward_accuracy"] > 0.5 and last["val_reward_margin"] > first["val_reward_margin"]
        assert {"reward_margin", "reward_accuracy", "chosen_logps", "rejected_logps"} <= metrics["train"][-1].keys()
        job = client.get(f"/jobs/{job_id}").json()
        assert job["progress"]["val_reward_accuracy"] == last["val_reward_accuracy"]
        assert job["parameters"]["method"] == method
        assert job["training_data"]["format"] == "preference"

        if method == "orpo":
            return  # the rest is the same for both methods
        # The adapter is an adapter like any other: it answers, and it fuses.
        answer = client.post(
            "/generate", json={"model": model_id, "prompt": "What is the capital of Spain?", "max_tokens": 12}
        )
        assert answer.status_code == 200, answer.text
        fused = client.post("/lora-fuse?wait=true", json={"base_model": "default", "lora_adapter": model_id})
        assert fused.status_code == 200, fused.text
