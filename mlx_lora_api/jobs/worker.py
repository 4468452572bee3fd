"""Carries out one job: `execute` is the plain function the CLI calls in-process, and
`process_main` the entry point of a server's worker process (which loads the fast BLAS
before anything imports MLX).

Each kind of job is the same three steps: find its inputs in the registry, run the verb
(`tasks/`) into a staged folder, write `meta.json` and publish. The verbs are imported inside
the functions that run them: they import MLX, which the server process, which imports this
module for `process_main`, must never load."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec

from .. import registry
from ..registry import Registry, hub
from ..tasks import checks
from ..types import (
    BaseModel,
    ExportSpec,
    FinetuneSpec,
    FuseSpec,
    JobSpec,
    ModelMeta,
    PushSpec,
    QuantizeSpec,
    decode_spec,
    job_kind,
)
from . import cluster, estimate, process
from .cluster import Cluster
from .process import Cancelled, begin, describe_error

log = logging.getLogger("mlx_lora_api")
EventSink = Callable[[dict[str, Any]], None]
WORKER_NICENESS = 10
ONE_RANK = Cluster()


def _base_path(base: BaseModel, on_event: EventSink) -> str:
    path = base.path
    if path is None:
        on_event({"type": "downloading", "base_model": base.ref})
        path = hub.download(base.ref)
    checks.check_model_folder(Path(path))
    return path


def _local(model: BaseModel) -> Path:
    """The folder of a registry model (jobs on existing models are given one)."""
    if model.path is None:
        raise FileNotFoundError(f"{model.ref!r} has no local folder")
    return Path(model.path)


def work_name(spec: FinetuneSpec) -> str:
    """Where a fine-tune keeps its checkpoints until it succeeds, under adapters/.staging/."""
    return f"{spec.model_id}-{spec.job_id}"


def finetune(spec: FinetuneSpec, reg: Registry, on_event: EventSink, ranks: Cluster = ONE_RANK) -> str:
    from ..tasks import finetune as training  # MLX: see the module's doc

    request = spec.request
    base_path = _base_path(spec.base, on_event)
    final = reg.adapter_dir(spec.model_id)
    with registry.staged(final, keep_if=registry.has_checkpoints, name=work_name(spec)) as work:
        resume = registry.has_checkpoints(work)
        size = ranks.size(request.parameters.ranks)
        if size > 1:  # every rank started through mlx.launch; rank 0 writes into `work`
            job = cluster.RankJob(
                base_path=base_path,
                base_ref=spec.base.ref,
                request=request,
                out_dir=str(work),
                resume=resume,
                retention_cache=str(reg.retention_cache),
                initial_weights=spec.initial_weights,
                levers=os.environ.get("MLX_LORA_API_LEVERS", "on"),
                backend=ranks.backend,
                hosts=list(ranks.hosts[:size]),
            )
            metrics = cluster.train(job, ranks, size, work, on_event)
        else:
            metrics = training.train_adapter(
                base_path,
                spec.base.ref,
                request,
                work,
                on_event,
                resume=resume,
                retention_cache=reg.retention_cache,
                initial_weights=Path(spec.initial_weights) if spec.initial_weights else None,
            )
        retained = metrics.pop("retention", None)
        meta = ModelMeta(
            kind="adapter",
            created_at=time.time(),
            base_model=spec.base.ref,
            base_source=spec.base.source,
            job_id=spec.job_id,
            parameters=msgspec.to_builtins(request.parameters),
            training_data=spec.data or request.data_summary,
            resumed_from=request.resume_from,
            metrics=metrics,
            retention=retained,
        )
        registry.write_meta(work, meta)
    if spec.estimate is not None and not metrics.get("stopped_early"):
        # This machine's rate, for the next estimates; the estimate beside what happened.
        estimate.Calibration(reg.data_dir / estimate.CALIBRATION_FILE).record(
            metrics.get("device", "cpu"), spec.estimate.flops, metrics.get("train_seconds", 0.0)
        )
        on_event(
            {
                "type": "estimate",
                "estimated_seconds": spec.estimate.estimated_seconds,
                "seconds": metrics.get("seconds"),
                "estimated_peak_memory_bytes": spec.estimate.estimated_peak_memory_bytes,
                "peak_memory_bytes": process.peak_rss_bytes(),
            }
        )
    loss = metrics.get("final_train_loss")
    message = f"adapter {spec.model_id} trained" + (f" (final train loss {loss:.4f})" if loss is not None else "")
    if metrics.get("stopped_early"):
        message += f"; {metrics['stopped_early']}, and the adapter kept is the {metrics['kept']} one"
    return message


def fuse(spec: FuseSpec, reg: Registry, on_event: EventSink) -> str:
    from ..tasks import fuse as fusing  # MLX

    adapter_dir = reg.adapter_dir(spec.adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter {spec.adapter!r} does not exist (did its fine-tune fail?)")
    checks.check_adapter_folder(adapter_dir)
    adapter_meta = registry.read_meta(adapter_dir)
    base_path = _base_path(spec.base, on_event)
    with registry.staged(reg.model_dir(spec.model_id)) as work, tempfile.TemporaryDirectory() as view:
        source = adapter_dir
        if spec.checkpoint is not None:  # the checkpoint, shown to the fuse as an adapter folder
            source = registry.checkpoint_view(adapter_dir, spec.checkpoint, Path(view))
        parity = fusing.fuse_adapter(base_path, source, work, spec.request.dequantize, on_event)
        meta = ModelMeta(
            kind="fused",
            created_at=time.time(),
            base_model=spec.base.ref,
            base_source=spec.base.source,
            adapter=spec.adapter,
            adapter_checkpoint=spec.checkpoint,
            job_id=spec.job_id,
            parameters=adapter_meta.parameters if adapter_meta else None,
            training_data=adapter_meta.training_data if adapter_meta else None,
            metrics=adapter_meta.metrics if adapter_meta else None,
            parity=parity,
            retention=adapter_meta.retention if adapter_meta else None,  # parity: the same answers
        )
        registry.write_meta(work, meta)
    at = f" at iteration {spec.checkpoint}" if spec.checkpoint is not None else ""
    return f"model {spec.model_id} fused from {spec.base.ref} and adapter {spec.adapter}{at}"


def quantize(spec: QuantizeSpec, reg: Registry, on_event: EventSink) -> str:
    from ..tasks import quantize as quantizing  # MLX

    source = _local(spec.base)
    source_meta = registry.read_meta(source)
    on_event({"type": "quantizing", "bits": spec.request.bits, "group_size": spec.request.group_size})
    with registry.staged(reg.model_dir(spec.model_id)) as work:
        figures = quantizing.quantize(source, work, spec.request.bits, spec.request.group_size)
        meta = ModelMeta(
            kind="base",
            created_at=time.time(),
            base_model=spec.base.ref,
            job_id=spec.job_id,
            source=f"{spec.base.ref} quantized to {spec.request.bits} bits",
            quantization=figures,
            hub_id=source_meta.hub_id if source_meta else None,
            license=source_meta.license if source_meta else None,
        )
        registry.write_meta(work, meta)
    return f"model {spec.model_id}: {spec.base.ref} at {figures['bits_per_weight']} bits per weight"


def export(spec: ExportSpec, reg: Registry, on_event: EventSink) -> str:
    from ..tasks import export_gguf, export_peft  # MLX

    folder = _local(spec.base)
    if spec.request.format == "peft":
        final = folder / "peft"
        on_event({"type": "exporting", "format": "peft"})
        with registry.staged(final) as work:
            if final.exists():
                shutil.rmtree(final)  # an export replaces the previous one
            written = export_peft.export_peft(folder, work, spec.base_name or spec.base.ref)
        return (
            f"exported {spec.model_id} as a PEFT adapter to {final} ({written['tensors']} tensors,"
            f" {', '.join(written['target_modules'])} in {written['layers']} layers)"
        )
    final = folder / "gguf"
    on_event({"type": "exporting", "format": spec.request.format})
    if spec.adapter_base is not None:
        with registry.staged(final) as work:
            if final.exists():
                shutil.rmtree(final)
            written = export_gguf.export_gguf_lora(folder, _local(spec.adapter_base), work, spec.model_id)
        return (
            f"exported {spec.model_id} as a GGUF LoRA adapter to {final / written['gguf']}: llama.cpp applies it"
            f" over the GGUF export of {spec.adapter_base.ref} (llama-server -m BASE.gguf --lora FILE)"
        )
    with registry.staged(final) as work:
        if final.exists():
            shutil.rmtree(final)  # an export replaces the previous one
        written = export_gguf.export_gguf(folder, work, spec.model_id)
    message = f"exported {spec.model_id} to {final / written['gguf']} with an Ollama Modelfile beside it"
    if written["no_template"]:
        on_event({"type": "warning", "message": f"the Modelfile has no TEMPLATE: {written['no_template']}"})
        message += f" (no TEMPLATE: {written['no_template']}; Ollama then uses the GGUF's own)"
    return message


def push(spec: PushSpec, reg: Registry, on_event: EventSink) -> str:
    request = spec.request
    on_event({"type": "uploading", "repo_id": request.repo_id, "private": request.private})
    message = request.commit_message or f"Upload {spec.model_id} with mlx-lora-api"
    url = hub.push(_local(spec.base), request.repo_id, request.private, message, spec.card)
    return f"pushed {spec.model_id} to {request.repo_id} ({url})"


JOBS: dict[str, Callable[[Any, Registry, EventSink], str]] = {
    "finetune": finetune,
    "fuse": fuse,
    "quantize": quantize,
    "export": export,
    "push": push,
}


def _finished_before(spec: JobSpec, reg: Registry) -> bool:
    """A job whose result was published just before the server died is not done twice."""
    kind = job_kind(spec)
    if kind not in ("finetune", "fuse", "quantize"):
        return False
    folder = (reg.adapter_dir if kind == "finetune" else reg.model_dir)(spec.model_id)
    meta = registry.read_meta(folder) if folder.is_dir() else None
    return meta is not None and meta.job_id == spec.job_id


def execute(spec: JobSpec, reg: Registry, on_event: EventSink = lambda event: None, ranks: Cluster = ONE_RANK) -> str:
    """Run one job to the end; returns a one-line summary, raises on failure. `ranks`: where a
    fine-tune may run data-parallel (the server's --ranks or --hostfile)."""
    reg.ensure_folders()
    if _finished_before(spec, reg):
        return f"{spec.model_id} was already complete"
    if isinstance(spec, FinetuneSpec):
        return finetune(spec, reg, on_event, ranks)
    return JOBS[job_kind(spec)](spec, reg, on_event)


def _raise_cancelled(signum, frame):
    raise Cancelled()


def process_main(
    conn: Connection, spec_bytes: bytes, data_dir: str, default_model: str, cluster_bytes: bytes = b""
) -> None:
    spec = decode_spec(spec_bytes)
    process.set_precision(job_kind(spec))
    begin("worker")
    # Training takes every core it can; the API process must still answer at once.
    os.nice(WORKER_NICENESS)
    signal.signal(signal.SIGTERM, _raise_cancelled)
    reg = Registry(Path(data_dir), default_model)

    def send(event: dict) -> None:
        conn.send_bytes(msgspec.json.encode({"time": time.time(), **event}))

    try:
        ranks = msgspec.json.decode(cluster_bytes, type=Cluster) if cluster_bytes else Cluster()
        summary = execute(spec, reg, send, ranks)
    except BaseException as e:
        if not isinstance(e, Cancelled):
            traceback.print_exc()
        send({"type": "error", "message": describe_error(e)})
        conn.close()
        sys.exit(1)
    send({"type": "done", "message": summary})
    conn.close()
