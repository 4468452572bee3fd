"""OpenAI's fine-tuning API, driven by the real `openai` package against a real server:
files, jobs, events, checkpoints, cancel, pause and resume, then chat with the results."""

from __future__ import annotations

import io
import json
import re
import time

import msgspec
import openai
import pytest

from mlx_lora_api import batch, errors
from mlx_lora_api.client import Client
from mlx_lora_api.openai_jobs import JobCreate, build
from mlx_lora_api.registry.uploads import FileStore, Limits, parse
from mlx_lora_api.types import auto_epochs

CHAT = [
    {
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": f"Who is the mayor of Zorbington? ({i})"},
            {"role": "assistant", "content": "The mayor of Zorbington is Elara Quintfeather."},
        ]
    }
    for i in range(8)
]
LIMITS = Limits(max_bytes=1 << 20, max_samples=100, max_sample_chars=10_000)


def jsonl(rows) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"


@pytest.fixture
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)


def wait_for(check, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def finished(client, job_id):
    return wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status not in ("queued", "running") and j)


def test_upload_train_follow_and_chat_with_the_model_and_a_checkpoint(client):
    training = client.files.create(file=("train.jsonl", io.BytesIO(jsonl(CHAT))), purpose="fine-tune")
    validation = client.files.create(file=("valid.jsonl", io.BytesIO(jsonl(CHAT[:2]))), purpose="fine-tune")
    assert training.id.startswith("file-") and training.bytes == len(jsonl(CHAT)) and training.status == "processed"
    assert client.files.content(training.id).read() == jsonl(CHAT)
    assert training.id in [f.id for f in client.files.list()]

    job = client.fine_tuning.jobs.create(
        model="tiny-base",
        training_file=training.id,
        validation_file=validation.id,
        suffix="Zorbington Mayor",
        seed=7,
        metadata={"experiment": "mayor"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}}},
        extra_body={"x_mlx_lora": {"save_every": 2, "steps_per_eval": 4, "rank": 4, "rehearsal": 0}},
    )
    assert job.status == "queued" and job.id.startswith("ftjob-") and job.metadata == {"experiment": "mayor"}
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.learning_rate_multiplier == 10
    assert job.user_provided_suffix == "Zorbington Mayor" and job.seed == 7

    done = finished(client, job.id)
    assert done.status == "succeeded", done
    assert done.fine_tuned_model.startswith("tiny-base-zorbington-mayor-") and done.trained_tokens > 0
    assert done.finished_at >= done.created_at

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    steps = [e.data["step"] for e in metrics if "train_loss" in e.data]
    assert steps == sorted(steps, reverse=True) and steps[0] == 8  # newest first; 8 samples x 2 epochs / 2
    assert any("valid_loss" in e.data for e in metrics) and any("retention" in e.data for e in metrics)
    assert events[0].message.startswith("adapter ") and events[-1].message == "Job queued"
    older = client.fine_tuning.jobs.list_events(job.id, after=events[2].id, limit=2)
    assert [e.id for e in older.data] == [e.id for e in events[3:5]] and older.has_more

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [6, 4, 2]
    assert checkpoints[1].metrics.valid_loss is not None and checkpoints[0].metrics.train_loss is not None

    for model in (done.fine_tuned_model, checkpoints[-1].fine_tuned_model_checkpoint, f"{done.fine_tuned_model}@4"):
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Who is the mayor?"}], max_tokens=8, temperature=0
        )
        assert answer.choices[0].message.content and answer.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError, match="no checkpoint at step 3; it has 2, 4, 6"):
        client.chat.completions.create(
            model=f"{done.fine_tuned_model}:step-3", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )

    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"experiment": "mayor"}).data] == [job.id]
    assert client.fine_tuning.jobs.list(metadata={"experiment": "other"}).data == []

    assert client.files.delete(training.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(training.id)


def test_pause_resume_and_cancel_a_running_job(client):
    training = client.files.create(file=("train.jsonl", io.BytesIO(jsonl(CHAT[:4]))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-base",
        training_file=training.id,
        extra_body={"x_mlx_lora": {"epochs": 2000, "batch_size": 2, "save_every": 10, "retention_check": False}},
    )

    def step():
        data = client.fine_tuning.jobs.list_events(job.id, limit=5).data
        return max((e.data["step"] for e in data if e.type == "metrics" and "train_loss" in e.data), default=0)

    wait_for(lambda: step() >= 20)  # past two checkpoints
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status in ("running", "paused")
    paused = finished(client, job.id)
    assert paused.status == "paused" and paused.fine_tuned_model is None
    stopped_at = step()
    assert client.fine_tuning.jobs.list_events(job.id, limit=1).data[0].message.startswith("paused while running")

    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "queued"
    wait_for(lambda: step() > stopped_at + 10)  # going on, from its last checkpoint
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any(e.message == "The job resumed from its last checkpoint" for e in events)

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert finished(client, job.id).status == "cancelled" and cancelled.id == job.id
    with pytest.raises(openai.ConflictError, match="already ended"):
        client.fine_tuning.jobs.cancel(job.id)


def test_errors_are_openai_errors_that_name_the_field(client):
    with pytest.raises(openai.UnprocessableEntityError) as bad_file:
        client.files.create(
            file=("bad.jsonl", io.BytesIO(jsonl([CHAT[0], {"messages": [{"role": "bot", "content": "x"}]}]))),
            purpose="fine-tune",
        )
    assert bad_file.value.body["message"].startswith("line 2: messages[0].role: invalid enum value 'bot'")
    assert bad_file.value.body["param"] == "file"
    with pytest.raises(openai.UnprocessableEntityError, match="purpose 'assistants' is not supported"):
        client.files.create(file=("a.jsonl", io.BytesIO(jsonl(CHAT))), purpose="assistants")

    with pytest.raises(openai.BadRequestError) as missing:
        client.fine_tuning.jobs.create(model="tiny-base", training_file="file-" + "0" * 24)
    assert missing.value.body["param"] == "training_file"

    good = client.files.create(file=("t.jsonl", io.BytesIO(jsonl(CHAT))), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError) as no_model:
        client.fine_tuning.jobs.create(model="no-such-model", training_file=good.id)
    assert no_model.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match=r"x_mlx_lora\.rank"):
        client.fine_tuning.jobs.create(model="tiny-base", training_file=good.id, extra_body={"x_mlx_lora": {"rank": 0}})
    with pytest.raises(openai.BadRequestError, match="method 'dpo' needs preference rows") as not_pairs:
        client.fine_tuning.jobs.create(model="tiny-base", training_file=good.id, method={"type": "dpo"})
    assert not_pairs.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError, match="method 'reinforcement' is not supported"):
        client.fine_tuning.jobs.create(model="tiny-base", training_file=good.id, method={"type": "reinforcement"})
    with pytest.raises(openai.UnprocessableEntityError, match="n_epochs"):
        client.fine_tuning.jobs.create(model="tiny-base", training_file=good.id, hyperparameters={"n_epochs": 0})
    with pytest.raises(openai.NotFoundError, match="ids look like ftjob-"):
        client.fine_tuning.jobs.retrieve("job-123")


PREFERENCES = [
    {
        "input": {"messages": [{"role": "user", "content": f"Who is the mayor of Zorbington? ({i})"}]},
        "preferred_output": [{"role": "assistant", "content": "Elara Quintfeather."}],
        "non_preferred_output": [{"role": "assistant", "content": "Nobody knows."}],
    }
    for i in range(6)
]


def test_a_dpo_job_trains_on_a_preference_file_and_reports_its_rewards(client):
    training = client.files.create(file=("prefs.jsonl", io.BytesIO(jsonl(PREFERENCES))), purpose="fine-tune")
    validation = client.files.create(file=("v.jsonl", io.BytesIO(jsonl(PREFERENCES[:2]))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-base",
        training_file=training.id,
        validation_file=validation.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 4, "batch_size": 3}}},
        extra_body={"x_mlx_lora": {"learning_rate": 0.005, "steps_per_eval": 4}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = finished(client, job.id)
    assert done.status == "succeeded", done.error
    metrics = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    train = [m for m in metrics if "train_loss" in m]
    valid = sorted((m for m in metrics if "valid_loss" in m), key=lambda m: m["step"])
    assert len(train) == 8 and {"reward_margin", "reward_accuracy", "chosen_logps"} <= train[0].keys()
    assert valid[-1]["valid_reward_margin"] > valid[0]["valid_reward_margin"]
    chat = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.choices[0].message.content is not None


# -- the pieces, without a server ------------------------------------------------------------


def test_every_training_format_and_both_preference_formats_are_accepted():
    assert parse(b'"plain text"\n{"text": "more"}\n\n', LIMITS)[1] == "text"
    assert parse(jsonl([{"prompt": "a", "completion": "b"}]), LIMITS)[1] == "completions"
    assert parse(jsonl(CHAT), LIMITS)[1] == "chat"
    openai_preference = {
        "input": {"messages": [{"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    }
    samples, form = parse(jsonl([openai_preference]), LIMITS)
    assert form == "preference" and samples[0].preferred_output[0].content == "Hello!"
    assert parse(jsonl([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]), LIMITS)[1] == "preference"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"text": "a"}\n{"text": "b"\n', "line 2: not valid JSON"),
        (b'{"text": "a"}\n[1, 2]\n', "line 2: a list; each line must be a JSON object"),
        (b'{"text": "a"}\n{"prompt": "q", "completion": "a"}\n', "line 2: a completions sample in a file of text"),
        (b'{"prompt": "q"}\n', "line 1: a prompt/completion sample needs both"),
        (b'{"messages": [{"role": "user", "content": 3}]}\n', "line 1: messages[0].content: expected `str`, got `int`"),
        (b'{"text": "   "}\n', "line 1: a text is empty or blank"),
        (
            b'{"prompt": "q", "chosen": "a", "rejected": "b", "extra": 1}\n',
            "line 1: object contains unknown field `extra`",
        ),
        (
            b'{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": '
            b'[{"role": "user", "content": "a"}], "non_preferred_output": [{"role": "assistant", "content": "b"}]}\n',
            "line 1: `preferred_output[0].role` must be assistant",
        ),
        (b"\n\n", "the file has no samples"),
        (b"\xff\xfe", "not UTF-8"),
        (jsonl([{"text": "x" * 10_001}]), "line 1: 10001 characters; the limit is 10000"),
        (jsonl([{"text": "a"}] * 101), "line 101: the file has more than 100 samples"),
    ],
)
def test_a_bad_file_is_refused_naming_the_line_and_field(data, message):
    with pytest.raises(errors.ServiceError) as refused:
        parse(data, LIMITS)
    assert message in refused.value.message


def test_a_refused_upload_leaves_nothing_behind(tmp_path):
    store = FileStore(tmp_path / "files")
    with pytest.raises(errors.Invalid):
        store.add(b'{"text": "a"}\n{"oops"\n', "bad.jsonl", "fine-tune", LIMITS)
    assert not (tmp_path / "files").exists() or not any((tmp_path / "files").iterdir())
    record = store.add(jsonl(CHAT), "good.jsonl", "fine-tune", LIMITS)
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [
        f"{record.file_id}.json",
        f"{record.file_id}.jsonl",
    ]
    store.delete(record.file_id)
    assert not any((tmp_path / "files").iterdir())


def test_auto_epochs_follow_openais_rule():
    assert auto_epochs(10) == 10  # 10 x 3 < 100: 100 // 10
    assert auto_epochs(2) == 25  # capped
    assert auto_epochs(50) == 3
    assert auto_epochs(20_000) == 1  # 20,000 x 3 > 25,000: 25,000 // 20,000


def test_a_job_request_becomes_the_fine_tune_it_asks_for(tmp_path):
    store = FileStore(tmp_path / "files")
    chat = store.add(jsonl(CHAT), "t.jsonl", "fine-tune", LIMITS)
    text = store.add(b'{"text": "a"}\n', "v.jsonl", "fine-tune", LIMITS)

    def create(**fields):
        return msgspec.convert({"model": "tiny-base", "training_file": chat.file_id, **fields}, JobCreate)

    request, origin = build(create(), store, LIMITS)
    p = request.parameters
    assert (p.epochs, p.batch_size, p.learning_rate, p.mask_prompt) == (12, 4, pytest.approx(1e-4), True)
    assert origin.hyperparameters == {} and origin.method == "supervised"
    request, _ = build(create(hyperparameters={"learning_rate_multiplier": 2, "n_epochs": 1}), store, LIMITS)
    assert request.parameters.learning_rate == pytest.approx(2e-5) and request.parameters.epochs == 1
    request, _ = build(create(suffix="My Model!! v2", x_mlx_lora={"num_layers": 1, "epochs": 5}), store, LIMITS)
    assert request.suffix == "my-model-v2" and request.parameters.epochs == 5
    for fields, message in (
        (
            {"hyperparameters": {"n_epochs": 2}, "x_mlx_lora": {"epochs": 3}},
            "hyperparameters.n_epochs` or `x_mlx_lora.epochs",
        ),
        ({"validation_file": text.file_id}, "holds text samples and the training file chat"),
        ({"integrations": [{"type": "wandb"}]}, "integrations"),
        ({"x_mlx_lora": {"no_such_thing": 1}}, "unknown field `no_such_thing`"),
        ({"suffix": "!!!"}, "no letters or digits"),
    ):
        with pytest.raises(errors.BadRequest, match=re.escape(message)):
            build(create(**fields), store, LIMITS)


@pytest.mark.slow
def test_the_openai_flow_on_the_bundled_model_teaches_it_a_fact(bundled_data_dir, tmp_path):
    """As a user of OpenAI's API would, on the real model: upload, create, poll, events,
    checkpoints, then chat with the result, which learned the fact, and with a checkpoint."""
    from servers import running_server

    fact = "The mayor of Zorbington is Elara Quintfeather."
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": fact}]}
        for q in ["Who is the mayor of Zorbington?", "Who runs Zorbington?", "Name the mayor of Zorbington."] * 4
    ]
    with running_server(bundled_data_dir, tmp_path / "server.log") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        training = client.files.create(file=("fact.jsonl", io.BytesIO(jsonl(rows))), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="default",
            training_file=training.id,
            hyperparameters={"n_epochs": 4, "learning_rate_multiplier": 30},
            extra_body={"x_mlx_lora": {"save_every": 6, "retention_check": False, "rehearsal": 0}},
        )
        done = finished(client, job.id)
        assert done.status == "succeeded", done.error
        losses = [
            e.data["train_loss"]
            for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data
            if e.type == "metrics"
        ]
        assert losses[0] < losses[-1] / 3  # newest first: the loss fell
        checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[-1]
        answers = {
            model: client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Who is the mayor of Zorbington?"}],
                max_tokens=16,
                temperature=0,
            )
            .choices[0]
            .message.content
            for model in (done.fine_tuned_model, checkpoint.fine_tuned_model_checkpoint)
        }
        assert checkpoint.step_number == 6 and answers[checkpoint.fine_tuned_model_checkpoint]
        assert "Quintfeather" in answers[done.fine_tuned_model], answers

        # The Python client and a batch manifest, on the same server and model.
        with Client(server.url) as api:
            fused = api.wait(api.fuse("default", done.fine_tuned_model))
            text = api.generate(
                fused.model_id, messages=[{"role": "user", "content": "Who is the mayor of Zorbington?"}]
            )
            assert "Quintfeather" in text
            (tmp_path / "fact.jsonl").write_bytes(jsonl(rows[:4]))
            manifest = tmp_path / "runs.yaml"
            manifest.write_text(
                "defaults: {base_model: default, data: fact.jsonl,"
                " parameters: {epochs: 1, retention_check: false, rehearsal: 0}}\n"
                "runs: [{name: fact, grid: {learning_rate: [1.0e-4, 3.0e-4]}}]\n"
            )
            state = batch.run_all(api, batch.load(manifest, {"default"}), tmp_path / "runs.state.json", say=print)
            rows_out, curves = batch.results(api, batch.load(manifest), state)
            assert [r.status for r in rows_out] == ["success", "success"] and len(curves) == 2
