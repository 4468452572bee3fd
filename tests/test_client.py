"""The Python client (mlx_lora_api/client.py) against a real server with a tiny base model."""

from __future__ import annotations

import pytest

from mlx_lora_api.client import ApiError, Client, JobFailed
from mlx_lora_api.types import Job, ModelRecord, Progress

FACT = ["The mayor of Zorbington is Elara Quintfeather."] * 4


@pytest.fixture
def api(tiny_server):
    with Client(tiny_server.url) as client:
        yield client


def test_train_fuse_and_chat_as_readme_shows(api):
    progress: list[Progress] = []
    job = api.finetune("default", FACT, learning_rate=1e-3, epochs=3, batch_size=2, steps_per_report=1, rehearsal=0)
    assert isinstance(job, Job) and job.kind == "finetune" and job.status in ("queued", "running")
    done = api.wait(job, on_progress=progress.append)
    assert done.status == "success" and done.progress.iteration == 6
    assert [p.iteration for p in progress][-1] == 6 and all(p.train_loss is not None for p in progress)

    fused = api.wait(api.fuse("default", done.model_id, suffix="mayor"))
    record = api.model(fused.model_id)
    assert isinstance(record, ModelRecord) and record.kind == "fused" and record.adapter == done.model_id
    text = api.generate(fused.model_id, messages=[{"role": "user", "content": "Who is the mayor?"}], max_tokens=6)
    streamed = "".join(
        api.stream(fused.model_id, messages=[{"role": "user", "content": "Who is the mayor?"}], max_tokens=6)
    )
    assert text and streamed == text  # greedy: the same text, whole or in pieces

    assert {done.model_id, fused.model_id} <= {m.model_id for m in api.models()}
    assert [m.model_id for m in api.models(kind="fused")] == [fused.model_id]
    assert api.jobs(limit=2)[0].job_id == fused.job_id
    events = list(api.events(done))
    assert events[0]["type"] == "queued" and events[-1]["type"] == "success"
    assert [e["seq"] for e in api.events(done, after=events[-2]["seq"])] == [events[-1]["seq"]]
    assert len(api.metrics(done).train) == 6

    export = api.wait(api.export(fused.model_id))
    assert export.status == "success" and any(f.endswith(".gguf") for f in api.model(fused.model_id).files or [])

    with pytest.raises(ApiError) as in_use:
        api.delete(done.model_id)
    assert in_use.value.status == 409 and fused.model_id in in_use.value.message
    api.delete(done.model_id, force=True)
    assert done.model_id not in {m.model_id for m in api.models()}


def test_errors_carry_the_status_and_the_servers_message(api):
    with pytest.raises(ApiError) as missing:
        api.finetune("no-such-base", FACT)
    assert missing.value.status == 404 and "no-such-base" in missing.value.message
    with pytest.raises(ApiError) as invalid:
        api.finetune("default", FACT, rank=0)
    assert invalid.value.status == 422 and "rank" in invalid.value.message
    with pytest.raises(ApiError) as no_job:
        api.job("job-000000000000")
    assert no_job.value.status == 404
    with pytest.raises(ApiError) as no_token:
        api.push("tiny-base", "me/model")
    assert no_token.value.status == 503 and "token" in no_token.value.message


def test_wait_raises_for_a_job_that_did_not_succeed_and_pause_resume_go_on(api):
    job = api.finetune("default", FACT, epochs=2000, batch_size=2, save_every=10, retention_check=False, rehearsal=0)
    for event in api.events(job):
        if event["type"] == "train" and event["iteration"] >= 20:
            break
    api.pause(job)
    with pytest.raises(JobFailed) as paused:
        api.wait(job)
    assert paused.value.job.status == "paused" and paused.value.status == 409
    assert api.resume(job).status == "queued"
    resumed = next(e for e in api.events(job) if e["type"] == "resumed")  # past the pause, live
    assert resumed["iteration"] >= 20 and resumed["iteration"] % 10 == 0
    api.cancel(job)
    assert api.wait(job, check=False).status == "cancelled"


def test_every_jobs_events_stream_live_from_where_the_list_left_off(api, tiny_server):
    import json

    import httpx

    listed = api._call("GET", "/jobs", type=dict)  # the raw list: its latest_event is the stream's start
    job = api.finetune("default", FACT, epochs=2, rehearsal=0, retention_check=False)
    seen = []
    headers = {"Last-Event-ID": str(listed["latest_event"])}
    with httpx.stream("GET", f"{tiny_server.url}/jobs/events", headers=headers, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                seen.append(event)
                if event["job_id"] == job.job_id and event["type"] == "success":
                    break  # the stream itself never ends
    mine = [e["type"] for e in seen if e["job_id"] == job.job_id]
    assert mine[0] == "queued" and mine[-1] == "success" and mine.count("train") == 2
    assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)
    with pytest.raises(ApiError) as bad:
        api._call("GET", "/jobs/events", headers={"Last-Event-ID": "x"})
    assert bad.value.status == 422
