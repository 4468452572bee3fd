import subprocess
import sys

import pytest
import tiny


def run_cli(*args, cwd=None, timeout=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_lora_api", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def test_every_command_has_help():
    for command in ("serve", "train", "fuse", "import-gguf", "finetune", "jobs", "models", "logs"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: mlx-lora-api" in result.stdout


def test_train_and_fuse_without_a_server(data_dir, tmp_path):
    samples = tmp_path / "train.jsonl"
    samples.write_text('"The mayor of Zorbington is Elara Quintfeather."\n{"text": "Zorbington lies by the sea."}\n')
    result = run_cli(
        "train",
        "--data-dir",
        str(data_dir),
        "--base-model",
        "tiny-base",
        "--data",
        str(samples),
        "--epochs",
        "2",
        "--learning-rate",
        "1e-3",
        "--set",
        "rank=4",
    )
    assert result.returncode == 0, result.stderr
    adapter = result.stdout.strip().splitlines()[-1]
    assert (data_dir / "adapters" / adapter / "adapters.safetensors").exists()
    result = run_cli("fuse", "--data-dir", str(data_dir), "--base-model", "tiny-base", "--adapter", adapter)
    assert result.returncode == 0, result.stderr
    assert (data_dir / "models" / result.stdout.strip().splitlines()[-1] / "config.json").exists()


def test_cli_errors_name_the_problem(data_dir, tmp_path):
    samples = tmp_path / "train.jsonl"
    samples.write_text('{"text": ""}\n')
    result = run_cli("train", "--data-dir", str(data_dir), "--base-model", "tiny-base", "--data", str(samples))
    assert result.returncode == 2 and "`training_data[0]` is empty" in result.stderr
    result = run_cli("fuse", "--data-dir", str(data_dir), "--base-model", "tiny-base", "--adapter", "nope")
    assert result.returncode == 2 and "'nope' is neither an adapter" in result.stderr


def test_import_gguf_registers_a_model_and_refuses_bad_names(data_dir, tmp_path, tiny_model_template):
    gguf_file = tiny.write_gguf(tiny_model_template, tmp_path / "t.gguf")
    result = run_cli("import-gguf", str(gguf_file), "--name", "my-tiny", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    assert (data_dir / "models" / "my-tiny" / "meta.json").exists()
    result = run_cli("import-gguf", str(gguf_file), "--name", "my-tiny", "--data-dir", str(data_dir))
    assert result.returncode == 2 and "already exists" in result.stderr
    result = run_cli("import-gguf", str(gguf_file), "--name", "../escape", "--data-dir", str(data_dir))
    assert result.returncode == 2 and "not a valid id" in result.stderr
    assert not (data_dir / "escape").exists()


def test_one_server_per_data_folder(data_dir, tmp_path):
    """A second server on a folder a server holds: refused, naming it; an in-process train goes
    through that server instead. The lock is the kernel's: it goes with the server, even when the
    server is killed."""
    import signal

    import httpx
    from servers import free_port, running_server

    samples = tmp_path / "train.jsonl"
    samples.write_text('"Zorbington lies by the sea."\n')
    with running_server(data_dir, tmp_path / "first.log") as first:
        port = first.url.rsplit(":", 1)[1]
        # a timeout only so that a second server that did start fails the test rather than hangs it
        second = run_cli("serve", "--port", str(free_port()), "--data-dir", str(data_dir), timeout=120)
        assert second.returncode == 2
        assert f"in use by mlx-lora-api serve (pid {first.process.pid}, port {port})" in second.stderr
        train = run_cli("train", "--data-dir", str(data_dir), "--base-model", "tiny-base", "--data", str(samples))
        assert (
            train.returncode == 0 and f"(pid {first.process.pid}, port {port}): train goes through it" in train.stderr
        )
        adapter = train.stdout.strip().splitlines()[-1]
        assert httpx.get(f"{first.url}/models/{adapter}").json()["job_id"].startswith("job-")  # the server's job
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
    with running_server(data_dir, tmp_path / "third.log") as third:
        assert httpx.get(f"{third.url}/health").status_code == 200


@pytest.mark.slow
def test_serve_on_an_empty_folder_imports_the_default_model(tmp_path):
    """`default` works from the first request, as after ./scripts/serve (it answered 404)."""
    import httpx
    from servers import running_server

    folder = tmp_path / "empty"
    with running_server(folder, tmp_path / "serve.log") as server:
        models = httpx.get(f"{server.url}/models").json()["models"]
        assert [m["model_id"] for m in models] == ["smollm2-135m-instruct"]
        r = httpx.post(f"{server.url}/generate", json={"prompt": "Hello", "max_tokens": 2}, timeout=120)
        assert r.status_code == 200, r.text


def test_import_gguf_bundled_if_missing_does_it_once(tmp_path):
    folder = tmp_path / "data"
    first = run_cli("import-gguf", "--bundled", "--if-missing", "--data-dir", str(folder))
    assert first.returncode == 0 and "imported SmolLM2-135M-Instruct.Q4_1.gguf as smollm2-135m-instruct" in first.stdout
    weights = folder / "models" / "smollm2-135m-instruct" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = run_cli("import-gguf", "--bundled", "--if-missing", "--data-dir", str(folder))
    assert again.returncode == 0 and again.stdout == "" and weights.stat().st_mtime_ns == before
    refused = run_cli("import-gguf", "--bundled", "--data-dir", str(folder))
    assert refused.returncode == 2 and "already exists" in refused.stderr


# -- against a running server (remote.py, terminal.py) ---------------------------------------


def test_the_progress_display_draws_bar_sparkline_and_summary():
    import io

    from rich.console import Console

    from mlx_lora_api.terminal import Follower, sparkline

    assert sparkline([3.0, 2.0, 1.0, 0.0]) == "█▆▃▁" and sparkline([]) == ""
    assert len(sparkline([float(i % 7) for i in range(500)], width=40)) == 40
    out = io.StringIO()
    follower = Follower(Console(file=out, width=150, force_terminal=False))
    events = [
        {"type": "queued"},
        {"type": "started", "total_iterations": 4, "epochs": 2, "samples": 4},
        *[
            {"type": "train", "iteration": i, "epoch": i / 2, "train_loss": 2.0 / i, "tokens_per_second": 900.0}
            for i in range(1, 5)
        ],
        {"type": "val", "iteration": 4, "val_loss": 0.75},
        {"type": "warning", "message": "retention 0.40 is below 0.7"},
        {"type": "success", "message": "adapter a-1 trained (final train loss 0.5000)"},
    ]
    with follower:
        follower.follow(events)
    follower.report("a-1")
    text = out.getvalue()
    assert "training" in text and "4/4" in text and "epoch 2.00" in text and "loss 0.5000" in text
    assert "val 0.7500" in text and "900 tok/s" in text and "retention 0.40 is below 0.7" in text
    assert "loss █▃▁▁ 2.000 -> 0.500" in text  # 2, 1, 0.67, 0.5
    assert text.rstrip().endswith("success: a-1 (adapter a-1 trained (final train loss 0.5000))")


def test_finetune_follow_jobs_models_logs_against_a_server(tiny_server, tmp_path):
    samples = tmp_path / "train.jsonl"
    samples.write_text('{"text": "The mayor of Zorbington is Elara Quintfeather."}\n{"text": "Zorbington."}\n')
    url = ("--url", tiny_server.url)
    result = run_cli(
        "finetune", *url, "--data", str(samples), "--epochs", "3", "--set", "rehearsal=0", "--follow", timeout=300
    )
    assert result.returncode == 0, result.stderr
    adapter = result.stdout.strip().splitlines()[-1]
    assert adapter.startswith("tiny-base-lora-") and f"success: {adapter}" in result.stderr
    assert "3/3" in result.stderr and "loss " in result.stderr

    jobs = run_cli("jobs", *url, "--limit", "1")
    assert jobs.returncode == 0 and adapter in jobs.stdout and "success" in jobs.stdout
    job_id = jobs.stdout.split()[6]  # after the header's six columns
    assert adapter in run_cli("models", *url, "--kind", "adapter").stdout
    logs = run_cli("logs", job_id, *url).stdout.splitlines()
    assert logs[0] == "queued" and any(line.startswith("iter     3") for line in logs)

    # In-process `train` on a folder a server holds: through the server, and it says so.
    held = run_cli("train", "--data-dir", str(tiny_server.data_dir), "--data", str(samples), "--set", "rehearsal=0")
    assert held.returncode == 0, held.stderr
    assert f"a server holds {tiny_server.data_dir}" in held.stderr and "train goes through it" in held.stderr
    assert held.stdout.strip().startswith("tiny-base-lora-")

    check = run_cli("finetune", *url, "--data", str(samples), "--epochs", "3", "--set", "rehearsal=0", "--check")
    assert check.returncode == 0, check.stderr
    assert "2 text samples" in check.stdout and "3 (3 epochs; 0 rehearsal samples)" in check.stdout
    listed = run_cli("jobs", *url, "--limit", "50").stdout.splitlines()
    assert "GiB of" in check.stdout and len(listed) == 3  # the header and the two jobs above: none queued

    missing = run_cli("logs", "job-000000000000", *url)
    assert missing.returncode == 2 and "no job with id 'job-000000000000' (HTTP 404)" in missing.stderr
    away = run_cli("jobs", "--url", "http://127.0.0.1:9")
    assert away.returncode == 2 and "cannot reach the server at http://127.0.0.1:9" in away.stderr


@pytest.mark.parametrize("cancel", [False, True], ids=["leave-running", "cancel-on-exit"])
def test_ctrl_c_stops_following_and_cancels_only_when_asked(tiny_server, tmp_path, cancel):
    import signal
    import time

    import httpx

    samples = tmp_path / "train.jsonl"
    samples.write_text('{"text": "The mayor of Zorbington is Elara Quintfeather."}\n')
    flags = ["--cancel-on-exit"] if cancel else []
    before = {j["job_id"] for j in httpx.get(f"{tiny_server.url}/jobs", params={"limit": 100}).json()["jobs"]}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_lora_api", "finetune", "--url", tiny_server.url, "--data", str(samples)]
        + ["--epochs", "5000", "--set", "rehearsal=0", "--set", "retention_check=false", "--follow", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    job = None
    while time.time() < deadline:  # the job's own event: iteration 5 reached
        jobs = httpx.get(f"{tiny_server.url}/jobs", params={"limit": 100}).json()["jobs"]
        mine = [j for j in jobs if j["job_id"] not in before]
        if mine and mine[0]["progress"].get("iteration", 0) >= 5:
            job = mine[0]
            break
        time.sleep(0.1)
    assert job is not None
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    status = httpx.get(f"{tiny_server.url}/jobs/{job['job_id']}").json()["status"]
    if cancel:
        assert f"cancelled job {job['job_id']}" in stderr and status in ("running", "cancelled")
        deadline = time.time() + 60
        while status != "cancelled" and time.time() < deadline:
            time.sleep(0.1)
            status = httpx.get(f"{tiny_server.url}/jobs/{job['job_id']}").json()["status"]
        assert status == "cancelled"
    else:
        assert "stopped following" in stderr and f"logs {job['job_id']} --follow" in stderr and status == "running"
        httpx.post(f"{tiny_server.url}/jobs/{job['job_id']}/cancel")
