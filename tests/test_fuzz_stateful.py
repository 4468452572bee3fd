"""Schemathesis's stateful run against a real server: it follows the OpenAPI links from the jobs
and models it creates to their GET, DELETE, cancel, resume, quantize and export, with fuzzed
inputs along the way. Hooks: `schemathesis_hooks.py`."""

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from servers import running_server

pytest.importorskip("schemathesis")

SCENARIOS = 600  # the CLI's --max-examples per run
REQUESTS = 1200
EXCLUDED = [  # checks that do not fit a service whose valid-looking requests may still be refused
    "not_a_server_error",  # replaced by the hooks' check, which allows the two 503s the service means
    "positive_data_acceptance",  # e.g. 2.0 for an integer field (JSON Schema allows it; msgspec does not)
    "missing_required_header",
    "ignored_auth",  # no API key is set here
    "unsupported_method",
]
ACCESS = re.compile(r'"(GET|POST|DELETE|PUT|PATCH|OPTIONS|HEAD) (\S+) HTTP/1\.1" (\d{3})')


def test_stateful_run_finds_no_server_error(data_dir, tmp_path):
    """Runs until 1,200 requests are answered: schemathesis ends a run early when Hypothesis finds
    that a scenario replays differently (the server's state moved on), so one seed is not enough."""
    log = tmp_path / "server.log"
    env = {**os.environ, "MLX_LORA_API_DEFAULT_MODEL": "tiny-base"}
    answers: list[tuple[str, str, int]] = []
    with running_server(data_dir, log, env=env) as server:
        for seed in range(1, 11):
            run = subprocess.run(
                [
                    Path(sys.executable).parent / "schemathesis",
                    "run",
                    f"{server.url}/openapi.json",
                    "--phases=stateful",
                    f"--max-examples={SCENARIOS}",
                    f"--seed={seed}",
                    "--request-timeout=60",
                    f"--exclude-checks={','.join(EXCLUDED)}",
                    "--exclude-path=/jobs/events",  # every job's events: a stream that never ends
                ],
                env={**env, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(Path(__file__).parent)},
                capture_output=True,
                text=True,
                cwd=tmp_path,
            )
            assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
            answers = [(m[1], m[2], int(m[3])) for m in ACCESS.finditer(log.read_text())]
            if len(answers) >= REQUESTS:
                break
    print(f"{len(answers)} requests in {seed} runs: {Counter(status for _, _, status in answers)}")
    assert len(answers) >= REQUESTS
    assert not [a for a in answers if a[2] >= 500 and a[2] != 503]  # the 503s were checked by the hook
    succeeded = Counter(f"{method} {route(path)}" for method, path, status in answers if status < 300)
    assert succeeded["POST /lora-finetune"] >= 10, succeeded  # jobs really ran, and links from them were followed
    for operation in ("GET /jobs/{id}", "POST /jobs/{id}/cancel", "GET /models/{id}", "DELETE /models/{id}"):
        assert succeeded[operation] >= 1, (operation, succeeded)


def route(path: str) -> str:
    return re.sub(r"/(jobs|models)/[^/]+", r"/\1/{id}", path.split("?")[0])
