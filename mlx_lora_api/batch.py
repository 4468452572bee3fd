"""Batch fine-tunes from a manifest (`mlx-lora-api batch runs.yaml`), through a running server.

    defaults:                        # optional: what every run has unless it says otherwise
      base_model: default
      parameters: {epochs: 3}
    runs:
      - name: mayor
        data: data/train.jsonl       # paths are relative to the manifest
        validation_data: data/valid.jsonl
        parameters: {learning_rate: 1.0e-4}
        grid: {learning_rate: [1.0e-4, 3.0e-4], rank: [8, 16]}   # every combination: 4 runs
        then: [fuse, export, {push: {repo_id: me/mayor-{run}}}]

Everything is checked before anything is queued (the manifest's fields, the data files, every
run's parameters through the service's own types, the base models), and errors name the run and
the field. Runs go through the server's queue one at a time, each with its steps. Each run is
keyed by the hash of what it trains (base, data, parameters), and the state is kept beside the
manifest (`NAME.state.json`): running the manifest again skips what finished, resumes what
failed, was cancelled or paused, and follows what is still running. At the end: a table, a CSV and
an SVG of every run's validation (else training) loss.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import yaml
from rich.console import Console
from rich.table import Table

from .client import ApiError, Client, read_samples
from .types import FinetuneRequest, Job
from .web.plots import loss_svg

STEPS = ("fuse", "export", "push")


class ManifestError(ValueError):
    """A manifest that cannot run, with where: `runs[2] (mayor).parameters.rank: ...`."""


class Step(msgspec.Struct, forbid_unknown_fields=True):
    repo_id: str | None = None  # push: `{run}` becomes the run's name
    private: bool = True


class RunSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str | None = None
    base_model: str | None = None
    data: str | None = None
    validation_data: str | None = None
    suffix: str | None = None
    parameters: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    then: list[str | dict[str, Step]] = []


class Manifest(msgspec.Struct, forbid_unknown_fields=True):
    runs: list[RunSpec]
    defaults: RunSpec = msgspec.field(default_factory=RunSpec)


class Run(msgspec.Struct, kw_only=True):
    """One run of the manifest, grid expanded: what is submitted, and its steps."""

    name: str
    key: str
    body: dict[str, Any]  # the fine-tune request
    steps: list[tuple[str, Step]]
    varied: dict[str, Any]  # the grid's values for this run


class RunState(msgspec.Struct, omit_defaults=True):
    """What a run has done so far (the state file)."""

    job_id: str | None = None
    adapter: str | None = None
    fused: str | None = None
    done_steps: list[str] = []
    seconds: float | None = None


def load(path: Path, known_models: set[str] | None = None) -> list[Run]:
    """The manifest's runs, grid expanded and checked; ManifestError naming the run and field."""
    try:
        raw = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not valid {'YAML' if path.suffix != '.json' else 'JSON'}: {e}") from None
    try:
        manifest = msgspec.convert(raw, Manifest)
    except msgspec.ValidationError as e:
        raise ManifestError(f"{path}: {_where(str(e))}") from None
    if not manifest.runs:
        raise ManifestError(f"{path}: `runs` is empty")
    runs: list[Run] = []
    for index, spec in enumerate(manifest.runs):
        label = f"runs[{index}]" + (f" ({spec.name})" if spec.name else "")
        runs.extend(_expand(spec, manifest.defaults, index, label, path.parent, known_models))
    names = [r.name for r in runs]
    if duplicated := sorted({n for n in names if names.count(n) > 1}):
        raise ManifestError(f"{path}: run names must differ; used more than once: {', '.join(duplicated)}")
    return runs


def _expand(spec: RunSpec, defaults: RunSpec, index: int, label: str, root: Path, known: set[str] | None) -> list[Run]:
    base = spec.base_model or defaults.base_model or "default"
    if known is not None and base not in known and "/" not in base:
        raise ManifestError(f"{label}.base_model: no model {base!r} on the server; it has {', '.join(sorted(known))}")
    data_file = spec.data or defaults.data
    if not data_file:
        raise ManifestError(f"{label}.data: give the training data file")
    training = _samples(root / data_file, f"{label}.data")
    valid_file = spec.validation_data or defaults.validation_data
    validation = _samples(root / valid_file, f"{label}.validation_data") if valid_file else None
    steps = _steps(spec.then or defaults.then, label)
    grid = {**defaults.grid, **spec.grid}
    for key, values in grid.items():
        if not values:
            raise ManifestError(f"{label}.grid.{key}: give at least one value")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    name = spec.name or f"run{index}"
    runs = []
    for combo in combos:
        parameters = {**defaults.parameters, **spec.parameters, **combo}
        body: dict[str, Any] = {"base_model": base, "training_data": training, "parameters": parameters}
        if validation is not None:
            body["validation_data"] = validation
        if spec.suffix or defaults.suffix:
            body["suffix"] = spec.suffix or defaults.suffix
        try:
            msgspec.convert(body, FinetuneRequest)
        except msgspec.ValidationError as e:
            where = f"{label}" + (f" with {combo}" if combo else "")
            raise ManifestError(f"{where}: {_where(str(e))}") from None
        run_name = name + "".join(f"-{k}={v}" for k, v in combo.items())
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        runs.append(Run(name=run_name, key=key, body=body, steps=steps, varied=combo))
    return runs


def _samples(path: Path, field: str) -> list[Any]:
    try:
        return read_samples(path)
    except ValueError as e:
        raise ManifestError(f"{field}: {e}") from None


def _steps(then: list[str | dict[str, Step]], label: str) -> list[tuple[str, Step]]:
    steps = []
    for i, item in enumerate(then):
        name, step = (item, Step()) if isinstance(item, str) else next(iter(item.items()), ("", Step()))
        if isinstance(item, dict) and len(item) != 1:
            raise ManifestError(f"{label}.then[{i}]: one step a item, as {{push: {{repo_id: ...}}}}")
        if name not in STEPS:
            raise ManifestError(f"{label}.then[{i}]: unknown step {name!r}; steps are {', '.join(STEPS)}")
        if name == "push" and not step.repo_id:
            raise ManifestError(f"{label}.then[{i}].push.repo_id: give the Hub repo to push to")
        steps.append((name, step))
    order = [n for n, _ in steps]
    if "export" in order and "fuse" not in order:
        raise ManifestError(f"{label}.then: export needs fuse before it (a GGUF file holds a whole model)")
    return steps


def _where(message: str) -> str:
    what, _, where = message.partition(" - at `$")
    return f"{where.rstrip('`').lstrip('.')}: {what}" if where else what


# -- running ---------------------------------------------------------------------------------


def run_all(
    client: Client,
    runs: list[Run],
    state_path: Path,
    on_run: Callable[[Run, Job], None] | None = None,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict[str, RunState]:
    """Every run, one at a time, with its steps; the state saved after each change."""
    state = _read_state(state_path)
    for run in runs:
        current = state.setdefault(run.key, RunState())
        started = time.perf_counter()
        job = _finetune(client, run, current, say)
        _save_state(state_path, state)
        if on_run:
            on_run(run, job)
        job = client.wait(job, check=False)
        if job.status != "success":
            say(f"{run.name}: {job.status}: {job.error or job.message}")
            continue
        current.adapter = job.model_id
        current.seconds = (current.seconds or 0) + time.perf_counter() - started
        _save_state(state_path, state)
        for name, step in run.steps:
            if name in current.done_steps:
                continue
            if not _step(client, run, current, name, step, say):
                break
            current.done_steps.append(name)
            _save_state(state_path, state)
    return state


def _finetune(client: Client, run: Run, current: RunState, say: Callable[[str], None]) -> Job:
    if current.job_id:
        try:
            job = client.job(current.job_id)
        except ApiError as e:
            if e.status != 404:
                raise
            say(f"{run.name}: job {current.job_id} is not on this server; starting again")
        else:
            if job.status == "success":
                say(f"{run.name}: done before ({job.model_id}); skipped")
                return job
            if job.status in ("failed", "cancelled", "paused"):
                say(f"{run.name}: {job.status} before; resuming job {job.job_id}")
                return client.resume(job)
            say(f"{run.name}: {job.status}; following job {job.job_id}")
            return job
    job = client.submit_finetune(run.body)
    current.job_id, current.done_steps = job.job_id, []
    say(f"{run.name}: queued job {job.job_id}")
    return job


def _step(client: Client, run: Run, current: RunState, name: str, step: Step, say: Callable[[str], None]) -> bool:
    assert current.adapter is not None
    if name == "fuse":
        job = client.wait(client.fuse(run.body["base_model"], current.adapter), check=False)
        if job.status == "success":
            current.fused = job.model_id
    elif name == "export":
        job = client.wait(client.export(current.fused or current.adapter), check=False)
    else:
        repo = (step.repo_id or "").replace("{run}", run.name.replace("=", "-"))
        job = client.wait(client.push(current.fused or current.adapter, repo, private=step.private), check=False)
    if job.status != "success":
        say(f"{run.name}: {name} {job.status}: {job.error or job.message}")
        return False
    say(f"{run.name}: {name} done")
    return True


def _read_state(path: Path) -> dict[str, RunState]:
    if not path.exists():
        return {}
    try:
        return msgspec.json.decode(path.read_bytes(), type=dict[str, RunState])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ManifestError(f"{path} is damaged ({e}); delete it to start the manifest afresh") from None


def _save_state(path: Path, state: dict[str, RunState]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(msgspec.json.format(msgspec.json.encode(state)))
    partial.replace(path)


# -- the results -----------------------------------------------------------------------------


class Result(msgspec.Struct):
    run: str
    key: str
    parameters: str
    status: str
    train_loss: float | None
    val_loss: float | None
    seconds: float | None
    job_id: str | None
    adapter: str | None
    fused: str | None
    steps: str


def results(client: Client, runs: list[Run], state: dict[str, RunState]) -> tuple[list[Result], dict[str, list]]:
    """A row per run, and each run's loss curve (validation where it has one, else training)."""
    rows, curves = [], {}
    for run in runs:
        current = state.get(run.key, RunState())
        train_loss = val_loss = None
        status = "not run"
        if current.job_id:
            job = client.job(current.job_id)
            status = job.status
            metrics = client.metrics(current.job_id)
            train_loss = metrics.train[-1].train_loss if metrics.train else None
            val_loss = metrics.validation[-1].val_loss if metrics.validation else None
            if metrics.validation:
                curves[run.name] = [(p.iteration, p.val_loss) for p in metrics.validation]
            else:
                curves[run.name] = [(p.iteration, p.train_loss) for p in metrics.train]
        rows.append(
            Result(
                run=run.name,
                key=run.key,
                parameters=json.dumps(run.body["parameters"], sort_keys=True),
                status=status,
                train_loss=train_loss,
                val_loss=val_loss,
                seconds=round(current.seconds, 1) if current.seconds else None,
                job_id=current.job_id,
                adapter=current.adapter,
                fused=current.fused,
                steps=",".join(current.done_steps),
            )
        )
    return rows, curves


def write_results(rows: list[Result], curves: dict[str, list], stem: Path, console: Console) -> tuple[Path, Path]:
    """The table on `console`, and STEM.results.csv and STEM.loss.svg beside the manifest."""
    table = Table("run", "status", "train loss", "val loss", "s", "adapter", "fused", box=None)
    for r in rows:
        table.add_row(
            r.run,
            r.status,
            _number(r.train_loss),
            _number(r.val_loss),
            f"{r.seconds:.0f}" if r.seconds else "-",
            r.adapter or "-",
            r.fused or "-",
        )
    console.print(table)
    csv_path = stem.with_name(f"{stem.name}.results.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(Result.__struct_fields__)
        for r in rows:
            writer.writerow(msgspec.structs.astuple(r))
    svg_path = stem.with_name(f"{stem.name}.loss.svg")
    kind = "validation" if any(r.val_loss is not None for r in rows) else "training"
    svg_path.write_text(loss_svg(f"{kind} loss per run", curves))
    return csv_path, svg_path


def _number(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"
