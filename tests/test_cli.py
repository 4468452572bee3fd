import subprocess
import sys

import pytest
import tiny


def run_cli(*args, cwd=None, timeout=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_lora_api", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def test_every_command_has_help():
    for command in ("serve", "train", "fuse", "import-gguf"):
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
    """A second server, or an in-process train, on a folder a server holds: refused, naming it.
    The lock is the kernel's: it goes with the server, even when the server is killed."""
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
        assert train.returncode == 2 and f"pid {first.process.pid}" in train.stderr
        assert "submit through it" in train.stderr and not list((data_dir / "adapters").iterdir())
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
