"""The CLI's commands against a running server (`--url`, else `MLX_LORA_API_URL`, else the server
that holds the data folder, else http://127.0.0.1:8000): `finetune`, `jobs`, `models`, `logs`,
and `train`/`fuse` where a server holds the folder. Through the Python client; progress on stderr,
the result (a model id) on stdout, so that `ADAPTER=$(mlx-lora-api finetune ...)` works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from .client import URL_VARIABLE, ApiError, Client
from .registry import lock
from .terminal import Follower, describe
from .types import Job


def server_url(args: argparse.Namespace, data_dir: Path) -> str:
    """`--url`, `MLX_LORA_API_URL`, the server holding `data_dir`, or the default port."""
    if getattr(args, "url", None):
        return args.url
    if os.environ.get(URL_VARIABLE):
        return os.environ[URL_VARIABLE]
    holder = lock.holder(data_dir)
    if holder and holder.get("port"):
        return f"http://127.0.0.1:{holder['port']}"
    return "http://127.0.0.1:8000"


def held_by_server(data_dir: Path) -> dict[str, Any] | None:
    """Who holds the data folder, where that is a server this CLI can reach."""
    holder = lock.holder(data_dir)
    return holder if holder and holder.get("port") else None


def run(call: Callable[[Client], int], url: str, api_key: str | None) -> int:
    """`call` with a client for `url`; errors as one line on stderr (exit 2; 1 for a server error)."""
    try:
        with Client(url, api_key) as client:
            return call(client)
    except ApiError as e:
        print(f"error: {e.message} (HTTP {e.status})", file=sys.stderr)
        return 1 if e.status >= 500 else 2
    except httpx.TransportError as e:
        print(f"error: cannot reach the server at {url}: {e} (start one: mlx-lora-api serve)", file=sys.stderr)
        return 2


def follow(client: Client, job: Job, cancel_on_exit: bool = False, console: Console | None = None) -> int:
    """Draw the job's progress until it ends; Ctrl-C stops following (and, with `cancel_on_exit`,
    cancels the job). Prints the model id on stdout when it succeeded."""
    follower = Follower(console)
    try:
        with follower:
            follower.follow(client.events(job))
    except KeyboardInterrupt:
        if cancel_on_exit:
            client.cancel(job)
            print(f"cancelled job {job.job_id}", file=sys.stderr)
        else:
            print(
                f"stopped following; job {job.job_id} goes on (mlx-lora-api logs {job.job_id} --follow)",
                file=sys.stderr,
            )
        return 130
    final = client.job(job)
    follower.report(final.model_id)
    if final.status != "success":
        return 1
    print(final.model_id)
    return 0


def submitted(client: Client, job: Job, args: argparse.Namespace) -> int:
    """After a submission: follow it, or say how to."""
    if getattr(args, "follow", False):
        return follow(client, job, getattr(args, "cancel_on_exit", False))
    print(f"queued job {job.job_id}: mlx-lora-api logs {job.job_id} --follow", file=sys.stderr)
    print(job.model_id)
    return 0


def finetune(client: Client, body: dict[str, Any], args: argparse.Namespace) -> int:
    job = client.submit_finetune(body)
    return submitted(client, job, args)


def check(client: Client, body: dict[str, Any]) -> int:
    """What `POST /datasets/check` says of a fine-tune, as lines."""
    report = client.check_dataset(body)
    seconds = "unknown yet" if report.estimated_seconds is None else f"{report.estimated_seconds:.0f} s"
    gib = 1 << 30
    rows = [
        ("data", f"{report.samples} {report.format} samples, {report.tokens} tokens, longest {report.longest}"),
        ("validation", f"{report.validation_samples} samples, {report.validation_tokens} tokens"),
        ("steps", f"{report.steps} ({report.epochs} epochs; {report.rehearsal_samples} rehearsal samples)"),
        ("time", f"{seconds} ({report.rate_source})"),
        (
            "peak memory",
            f"{report.estimated_peak_memory_bytes / gib:.2f} GiB of {report.memory_bytes / gib:.1f} GiB"
            + ("" if report.fits else ": too large; --force queues it anyway"),
        ),
        *(("note", note) for note in report.notes),
    ]
    _table(("", ""), rows, ids=())
    return 0 if report.fits else 1


def fuse(client: Client, body: dict[str, Any], args: argparse.Namespace) -> int:
    job = client.fuse(
        body["base_model"], body["lora_adapter"], suffix=body.get("suffix"), dequantize=body["dequantize"]
    )
    return submitted(client, job, args)


def jobs(client: Client, args: argparse.Namespace) -> int:
    rows = []
    for job in client.jobs(limit=args.limit, status=args.status):
        p = job.progress
        done = f"{p.iteration}/{p.total_iterations}" if p.total_iterations else "-"
        loss = f"{p.train_loss:.4f}" if p.train_loss is not None else "-"
        rows.append((job.job_id, job.kind, job.status, done, loss, job.model_id))
    _table(("job", "kind", "status", "progress", "loss", "model"), rows, ids=(0, 5))
    return 0


def models(client: Client, args: argparse.Namespace) -> int:
    rows = [
        (m.model_id, m.kind, m.status, m.base_model or "-", f"{m.size_bytes / 2**20:.1f} MiB", _when(m.created_at))
        for m in client.models(kind=args.kind)
    ]
    _table(("model", "kind", "status", "base", "size", "created"), rows, ids=(0, 3))
    return 0


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], ids: tuple[int, ...]) -> None:
    """Rows under a header; id columns are never cut (they are what gets copied)."""
    table = Table(*header, box=None)
    for i in ids:
        table.columns[i].min_width = max((len(r[i]) for r in rows), default=0)
        table.columns[i].no_wrap = True
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 240).print(table)


def logs(client: Client, args: argparse.Namespace) -> int:
    """The job's events, one line each, past and then live until the job ends (Ctrl-C stops);
    with --follow, the progress bar instead of lines."""
    if args.follow:
        job = client.job(args.job)
        if job.status in ("queued", "running"):
            return follow(client, job)
    for event in client.events(args.job):
        if (line := describe(event)) is not None:
            print(line)
    return 0


def batch(client: Client, args: argparse.Namespace) -> int:
    """A manifest's runs, one at a time (batch.py), then the table, the CSV and the plot."""
    from . import batch as manifests

    known = {m.model_id for m in client.models()} | {"default"}
    try:
        runs = manifests.load(args.manifest, known)
    except manifests.ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        for run in runs:
            steps = ", ".join(name for name, _ in run.steps) or "-"
            print(f"{run.name}  {run.key}  {json.dumps(run.body['parameters'], sort_keys=True)}  then: {steps}")
        return 0
    console = Console(stderr=True)
    stem = args.manifest.with_suffix("")
    state = manifests.run_all(client, runs, stem.with_name(f"{stem.name}.state.json"), say=console.print)
    rows, curves = manifests.results(client, runs, state)
    csv_path, svg_path = manifests.write_results(rows, curves, stem, Console(width=240))
    print(f"{csv_path}\n{svg_path}", file=sys.stderr)
    return 0 if all(r.status == "success" for r in rows) else 1


def _when(timestamp: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")
