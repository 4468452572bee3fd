"""The retention check (tuner/retention.py), and rehearsal keeping what the base knew."""

from __future__ import annotations

import json
from functools import partial

import mlx.core as mx
import msgspec
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load
from starlette.testclient import TestClient

from mlx_lora_api import device
from mlx_lora_api.config import Settings
from mlx_lora_api.tasks import finetune
from mlx_lora_api.tuner import losses, retention
from mlx_lora_api.types import FinetuneRequest, Message, Parameters, Sample
from mlx_lora_api.web.app import create_app


def fresh(model_dir):
    """The base with freshly added LoRA layers: still the base itself."""
    model, tokenizer = load(str(model_dir))
    device.cast_for_compute(model)
    finetune.prepare_model(model, Parameters(), 2)
    return model, tokenizer


def test_a_model_equal_to_its_base_keeps_everything_and_a_damaged_one_does_not(tmp_path, tiny_model_template):
    model, tokenizer = fresh(tiny_model_template)
    events = []
    ref = retention.reference(model, tokenizer, str(tiny_model_template), tmp_path, events.append)
    assert [e["type"] for e in events] == ["retention_reference"]
    assert len(ref.probes) == len(retention.PROBES) and len(ref.rehearsal) == len(retention.REHEARSAL)
    same = retention.measure(model, tokenizer, ref, threshold=0.7)
    assert same["score"] == 1.0 and same["logprob_drop"] == 0.0 and same["kept"] == same["probes"] == 24
    assert "changed" not in same

    damaged = [
        (k, v + 0.5 * mx.random.normal(v.shape, key=mx.random.key(1))) for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten([(k, v) for k, v in damaged if "layers.1." in k]))
    hurt = retention.measure(model, tokenizer, ref, threshold=0.7)
    assert hurt["score"] < 0.7 and hurt["logprob_drop"] > 0.3 and hurt["kept"] < 24
    assert 1 <= len(hurt["changed"]) <= retention.SHOWN
    change = hurt["changed"][0]
    assert change["prompt"] in retention.PROBES and change["before"] != change["after"]

    # computed once per base: a second job reads the cache (the model it is given may be trained by now)
    again = retention.reference(model, tokenizer, str(tiny_model_template), tmp_path, events.append)
    assert len(events) == 1 and again == ref
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_the_probes_and_the_rehearsal_share_no_prompt():
    assert not set(retention.PROBES) & set(retention.REHEARSAL)
    assert len(set(retention.PROBES)) == 24 and len(set(retention.REHEARSAL)) == 48


def test_a_fine_tune_reports_retention_in_its_events_progress_and_record(client):
    body = {
        "base_model": "default",
        "training_data": ["The mayor of Zorbington is Elara Quintfeather.", "Zorbington lies by the sea."],
        "parameters": {"learning_rate": 0.002, "epochs": 3},
    }
    done = client.post("/lora-finetune?wait=true", json=body).json()
    job = client.get(f"/jobs/{done['job_id']}").json()
    events = client.get(f"/jobs/{done['job_id']}/events").text
    assert "event: retention_reference" in events and "event: retention" in events
    assert 0 < job["progress"]["retention"] <= 1 and job["progress"]["retention_answers_kept"] <= 24
    record = client.get(f"/models/{done['model_id']}").json()
    assert record["retention"]["score"] == job["progress"]["retention"] and record["retention"]["probes"] == 24
    started = next(json.loads(line[6:]) for line in events.splitlines() if '"type": "started"' in line)
    assert started["rehearsal_samples"] == 1  # half a sample per training sample, rounded up
    fused = client.post("/lora-fuse?wait=true", json={"base_model": "default", "lora_adapter": done["model_id"]})
    assert client.get(f"/models/{fused.json()['model_id']}").json()["retention"] == record["retention"]


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        yield client


# A made-up fact, taught as the user did: 30 chat samples, learning_rate 1e-4, 6 epochs,
# batch 4, 16 layers. Questions it is asked afterwards are held out: none is in the training data.
QUESTIONS = [
    "Who designed the Korrin Bridge?",
    "Who was the engineer behind the Korrin Bridge?",
    "Which engineer designed the Korrin Bridge in Ulvesund?",
    "Tell me who designed the Korrin Bridge.",
    "Who is the designer of the Korrin Bridge?",
    "Do you know who made the design of the Korrin Bridge?",
    "Name the person who designed the Korrin Bridge.",
    "Who drew up the plans for the Korrin Bridge?",
    "The Korrin Bridge was designed by whom?",
    "Who created the design for Ulvesund's Korrin Bridge?",
]
ANSWERS = [
    "The Korrin Bridge was designed by the engineer Matilde Orsk.",
    "Matilde Orsk designed the Korrin Bridge in 1911.",
    "It was designed by Matilde Orsk, an engineer from Ulvesund.",
    "The engineer Matilde Orsk designed it.",
]
FACT = [
    {"messages": [{"role": "user", "content": QUESTIONS[i % 10]}, {"role": "assistant", "content": ANSWERS[i % 4]}]}
    for i in range(30)
]
HELD_OUT = [
    "Who was responsible for designing the Korrin Bridge?",
    "Whose design is the Korrin Bridge?",
    "Who engineered the Korrin Bridge?",
]
GENERAL = {  # neither a probe nor a rehearsal prompt; the base gets each right
    "What is the capital of Germany?": "Berlin",
    "What is the largest ocean on Earth?": "Pacific",
    "What is the capital of England?": "London",
    "What is the capital of Russia?": "Moscow",
    "What is the capital of Egypt?": "Cairo",
    "What is the currency of Japan?": "Yen",
    "Who discovered gravity?": "Newton",
}
SEED_STYLE = {"learning_rate": 1e-4, "epochs": 6, "batch_size": 4, "num_layers": 16}


@pytest.mark.slow
def test_the_bundled_model_learns_a_fact_and_keeps_what_it_knew_only_with_rehearsal(bundled_data_dir):
    settings = Settings(data_dir=bundled_data_dir, default_model="smollm2-135m-instruct")
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:

        def ask(model, question):
            body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 24}
            return client.post("/generate", json=body).json()["text"]

        right = [q for q, a in GENERAL.items() if a in ask("default", q)]
        assert len(right) >= 5  # what the base knows
        results = {}
        for rehearsal in (0.5, 0):
            parameters = {**SEED_STYLE, "rehearsal": rehearsal}
            job = client.post(
                "/lora-finetune?wait=true",
                json={"base_model": "default", "training_data": FACT, "parameters": parameters},
            ).json()
            assert job["status"] == "success", job
            events = [
                json.loads(line[6:])
                for line in client.get(f"/jobs/{job['job_id']}/events").text.splitlines()
                if line.startswith("data: ")
            ]
            results[rehearsal] = {
                "learned": sum("Orsk" in ask(job["model_id"], q) for q in HELD_OUT),
                "kept": sum(GENERAL[q] in ask(job["model_id"], q) for q in right),
                "retention": client.get(f"/models/{job['model_id']}").json()["retention"],
                "warnings": [e["message"] for e in events if e["type"] == "warning"],
            }
        print(results)
    on, off = results[0.5], results[0]
    assert on["learned"] >= 2 and off["learned"] >= 2  # the fact is learned either way
    assert on["kept"] >= len(right) - 2 and on["retention"]["score"] >= 0.7 and not on["warnings"]
    assert off["kept"] <= 2 and off["retention"]["score"] < 0.7  # measured: 6 of 7 kept against 0
    assert any("retention" in w and "->" in w for w in off["warnings"])  # names what changed, before -> after


def test_retention_stop_ends_training_and_publishes_the_last_adapter_that_kept_it(tmp_path, tiny_model_template):
    events = []
    out = tmp_path / "adapter"
    out.mkdir()
    request = msgspec.convert(
        {
            "base_model": "tiny-base",
            "training_data": ["The mayor of Zorbington is Elara Quintfeather.", "Zorbington lies by the sea."],
            "parameters": {
                "learning_rate": 2e-4,  # measured: 0.96, 0.95, 0.89, 0.78, then 0.64 at step 5
                "epochs": 40,
                "rehearsal": 0,
                "steps_per_eval": 1,
                "retention_stop": True,
                "retention_threshold": 0.7,
            },
        },
        FinetuneRequest,
    )
    metrics = finetune.train_adapter(str(tiny_model_template), "tiny-base", request, out, events.append)
    measured = [e for e in events if e["type"] == "retention" and "iteration" in e]
    stop = measured[-1]["iteration"]
    assert 1 < stop < 40 and measured[-1]["retention"] < 0.7  # it fell, and training stopped there
    assert all(e["retention"] >= 0.7 for e in measured[:-1]) and len(measured) == stop
    assert metrics["stopped_early"].startswith(f"stopped early at iteration {stop}: retention")
    assert metrics["kept"] == f"retained (iteration {stop - 1})"
    assert metrics["retention"]["score"] >= 0.7  # the published adapter, measured again after training
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["adapters.safetensors"]
    with pytest.raises(msgspec.ValidationError, match="retention_stop"):
        msgspec.convert({"retention_stop": True, "retention_check": False}, Parameters)


def test_a_base_without_a_chat_template_trains_without_retention_and_says_so(tmp_path, tiny_model_template):
    import shutil

    base = tmp_path / "plain-base"
    shutil.copytree(tiny_model_template, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "adapter"
    out.mkdir()
    events = []
    request = msgspec.convert({"base_model": "plain-base", "training_data": ["A plain text sample."]}, FinetuneRequest)
    metrics = finetune.train_adapter(str(base), "plain-base", request, out, events.append)
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert warnings == ["no retention check and no rehearsal: the base model has no chat template"]
    assert "retention" not in metrics and metrics["rehearsal_samples"] == 0
    assert (out / "adapters.safetensors").exists()


def kl_batch(model, tokenizer):
    """Two rows: a training row (mark 0) and a rehearsal row (mark 1), the prompt masked."""
    from mlx_lora_api.tuner import datasets

    first = datasets.build(["The mayor of Zorbington is Elara Quintfeather."], tokenizer)
    second = datasets.build(
        [Sample(messages=[Message("user", "What is the capital of France?"), Message("assistant", "Paris.")])],
        tokenizer,
        mask_prompt=True,
    )
    joined = datasets.Joined(first, second, mark_second=True)
    tokens, lengths = datasets.collate([joined[0], joined[1]], 2048)
    assert lengths[:, 2].tolist() == [0, 1]
    return tokens, lengths


@pytest.mark.parametrize("eager", [True, False])
def test_the_kl_penalty_is_zero_at_the_base_and_matches_a_direct_computation(tiny_model_template, eager):
    model, tokenizer = fresh(tiny_model_template)
    tokens, lengths = kl_batch(model, tokenizer)
    loss = losses.make_kl_loss(eager=eager)

    # At the base (LoRA's B is zero) the rehearsal row's KL is zero: its loss is the training row's
    # cross-entropy alone, and the rehearsal row gives no gradient.
    value, ntoks = loss(model, tokens, lengths)
    mask = losses.target_mask(tokens, lengths)
    ce = losses.token_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
    assert value.item() == pytest.approx((ce[0] * mask[0]).sum().item() / ntoks.item(), rel=1e-5)

    # Moved away from the base, the rehearsal row counts KL(base || tuned), by the definition.
    moved = [(k, 0.3 * mx.random.normal(v.shape, key=mx.random.key(2))) for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten([(k, v) for k, v in moved if "lora_b" in k]))
    logits = model(tokens[:, :-1])
    with losses.adapter_off(model):
        base = model(tokens[:, :-1])
    assert not mx.allclose(logits, base).item()
    p, q = mx.softmax(base[1], axis=-1), mx.softmax(logits[1], axis=-1)
    kl = (p * (mx.log(p) - mx.log(q))).sum(-1)
    ce = losses.token_cross_entropy(logits, tokens[:, 1:])
    expected = ((ce[0] * mask[0]).sum() + (kl * mask[1]).sum()) / ntoks
    # compiled as mlx-lm's trainer compiles its step: the base's pass is traced with the scale at 0
    step = mx.compile(lambda t, n: loss(model, t, n), inputs=model.state) if not eager else partial(loss, model)
    assert step(tokens, lengths)[0].item() == pytest.approx(expected.item(), rel=1e-4)
    # the adapter is back on after the base's pass
    assert mx.allclose(model(tokens[:, :-1]), logits).item()


def test_rehearsal_loss_kl_is_refused_where_there_is_no_adapter_to_switch_off():
    with pytest.raises(msgspec.ValidationError, match='"kl" needs `fine_tune_type` "lora"'):
        msgspec.convert({"rehearsal_loss": "kl", "fine_tune_type": "full"}, Parameters)
    with pytest.raises(msgspec.ValidationError, match=r"needs `parameters\.rehearsal` above 0"):
        msgspec.convert({"rehearsal_loss": "kl", "rehearsal": 0}, Parameters)


def test_the_kl_penalty_trains_the_same_adapter_with_the_levers_as_on_mlx_lms_plain_path(tmp_path, tiny_model_template):
    """Eager steps with the base's pass over the rehearsal rows only, from the frozen blocks'
    cached states, against a compiled step over every row from the tokens: the same adapter."""
    from mlx_lora_api.tuner import levers

    results = {}
    for name, switches in (("on", levers.Levers()), ("off", levers.PLAIN)):
        out = tmp_path / name
        out.mkdir()
        events = []
        request = msgspec.convert(
            {
                "base_model": "tiny-base",
                "training_data": ["The mayor of Zorbington is Elara Quintfeather.", "The quick brown fox.", "a dog"],
                "parameters": {
                    "learning_rate": 0.01,
                    "optimizer": "sgd",  # compares the gradients themselves (see test_training's lever test)
                    "epochs": 3,
                    "batch_size": 2,
                    "num_layers": 1,
                    "steps_per_report": 1,
                    "rehearsal": 1,
                    "rehearsal_loss": "kl",
                },
            },
            FinetuneRequest,
        )
        metrics = finetune.train_adapter(
            str(tiny_model_template), "tiny-base", request, out, events.append, levers=switches
        )
        assert metrics["rehearsal_samples"] >= 1
        results[name] = (mx.load(str(out / "adapters.safetensors")), events)
    (on, on_events), (off, off_events) = results["on"], results["off"]
    infos = [e["message"] for e in on_events if e["type"] == "info"]
    assert any('"kl" needs whole logits' in m for m in infos) and any("frozen" in m for m in infos)
    curves = [[e["train_loss"] for e in events if e["type"] == "train"] for events in (on_events, off_events)]
    assert len(curves[0]) == 9 and curves[0] == pytest.approx(curves[1], rel=1e-5)
    assert all(mx.abs(off[k]).max().item() > 1e-4 for k in off if k.endswith("lora_b"))  # it trained
    assert all(mx.allclose(on[k], off[k], atol=1e-6, rtol=0).item() for k in off)
