"""Ollama's template engine for the tests: Go's text/template, given the values Ollama gives a
template (ollama_template/main.go), built once per session with the Go toolchain."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent / "ollama_template"


def build(out: Path) -> Path:
    if shutil.which("go") is None:
        pytest.fail("Go is not installed: ./scripts/setup --for-tests installs it (apt-get install golang-go)")
    binary = out / "ollama-template"
    env = {"GOCACHE": str(out / "cache"), "GOPATH": str(out / "gopath"), "GOFLAGS": "-mod=mod", "HOME": str(out)}
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=SOURCE, check=True, env={**os.environ, **env})
    return binary


def render(binary: Path, modelfile: str, messages: list[dict[str, str]]) -> str:
    """The prompt Ollama would build from this Modelfile's TEMPLATE for a chat."""
    given = json.dumps({"modelfile": modelfile, "messages": messages})
    return subprocess.run([str(binary)], input=given, capture_output=True, text=True, check=True).stdout
