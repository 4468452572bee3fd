"""OpenAI's fine-tuning API over the service's own jobs: `/v1/files` and `/v1/fine_tuning/jobs`.

Scripts written against OpenAI's API, and tools built on the `openai` package, run against this
service with only `base_url` changed. Ids map one to one: `ftjob-<hex>` is the job `job-<hex>`
(`GET /jobs/...` shows the same job), `ftevent-<n>` its event number n, `ftckpt-<hex>-<step>`
its checkpoint at that step. Statuses: queued, running, succeeded, failed, cancelled, paused.
Decoding the job request and turning it into a fine-tune is `openai_jobs`; here are only the
shapes of HTTP.
"""

from __future__ import annotations

import re
import time
from typing import Any, TypeVar

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response

from .. import errors
from ..openai_jobs import JobCreate
from ..types import BASE_LEARNING_RATE, PREFERENCE_METRICS, FileRecord, FinetuneSpec, Job, Parameters
from .bodies import (
    FileDeleted,
    FileList,
    FileObject,
    FineTuningCheckpoint,
    FineTuningCheckpointList,
    FineTuningError,
    FineTuningEvent,
    FineTuningEventList,
    FineTuningJob,
    FineTuningJobList,
)
from .codec import decode, read_body, respond

T = TypeVar("T")
create_decoder = msgspec.json.Decoder(JobCreate)
STATUSES = {"success": "succeeded"}  # the others are OpenAI's words already
_METADATA = re.compile(r"metadata\[(.+)\]")


# -- ids -----------------------------------------------------------------------------------


def openai_job_id(job_id: str) -> str:
    return "ft" + job_id  # job-<hex> -> ftjob-<hex>


def our_job_id(value: str) -> str:
    if not value.startswith("ftjob-"):
        raise errors.NotFound(
            f"no fine-tuning job with id {value!r}; ids look like ftjob-...", param="fine_tuning_job_id"
        )
    return value[2:]


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt-{job_id.removeprefix('job-')}-{step}"


# -- files ---------------------------------------------------------------------------------


def file_object(record: FileRecord) -> FileObject:
    return FileObject(record.file_id, record.bytes, int(record.created_at), record.filename, record.purpose)


async def upload_file(request: Request) -> Response:
    """Multipart: `file` (JSONL) and `purpose` (fine-tune), as OpenAI's `files.create` sends them."""
    service = request.app.state.service
    limit = request.app.state.settings.max_body_bytes
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise errors.BadRequest("send the file as multipart/form-data, with fields `file` and `purpose`")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + 65536:
        raise errors.PayloadTooLarge(f"the upload is {declared} bytes; the limit is {limit}")
    async with request.form(max_files=1, max_fields=8) as form:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise errors.BadRequest("the upload has no `file` part", param="file")
        if not isinstance(purpose, str) or not purpose:
            raise errors.BadRequest("the upload has no `purpose` field; use fine-tune", param="purpose")
        data = await upload.read(limit + 1)
        filename = upload.filename or "upload.jsonl"
    if len(data) > limit:
        raise errors.PayloadTooLarge(f"the file is over the limit of {limit} bytes", param="file")
    record = await run_in_threadpool(service.add_file, data, filename, purpose)
    return respond(file_object(record))


async def list_files(request: Request) -> Response:
    service = request.app.state.service
    records = await run_in_threadpool(service.files.list)
    purpose = request.query_params.get("purpose")
    if purpose:
        records = [r for r in records if r.purpose == purpose]
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise errors.Invalid(f"`order` must be asc or desc, not {order!r}", param="order")
    if order == "asc":
        records.reverse()
    page, more = _page(request, [file_object(r) for r in records], "file", 10_000)
    return respond(FileList(page, more, page[0].id if page else None, page[-1].id if page else None))


async def get_file(request: Request) -> Response:
    service = request.app.state.service
    return respond(file_object(await run_in_threadpool(service.files.get, request.path_params["file_id"])))


async def file_content(request: Request) -> Response:
    service = request.app.state.service
    data = await run_in_threadpool(service.files.content, request.path_params["file_id"])
    return Response(data, media_type="application/jsonl")


async def delete_file(request: Request) -> Response:
    service = request.app.state.service
    file_id = request.path_params["file_id"]
    await run_in_threadpool(service.files.delete, file_id)
    return respond(FileDeleted(file_id))


# -- jobs ----------------------------------------------------------------------------------


def _method(params: Parameters, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    if params.method == "dpo":
        return {"type": "dpo", "dpo": {"hyperparameters": {**hyperparameters, "beta": params.dpo_beta}}}
    if params.method == "orpo":  # created through the service's own API; OpenAI has no such method
        return {"type": "orpo", "orpo": {"hyperparameters": {**hyperparameters, "orpo_lambda": params.orpo_weight}}}
    return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}


def job_object(job: Job, spec: FinetuneSpec) -> FineTuningJob:
    params = spec.request.parameters
    origin = spec.openai
    hyperparameters = {
        "n_epochs": params.epochs,
        "batch_size": params.batch_size,
        "learning_rate_multiplier": round(params.concrete()[0] / BASE_LEARNING_RATE, 6),
    }
    estimated = None
    if job.status == "running" and job.progress.eta_seconds is not None:
        estimated = int(time.time() + job.progress.eta_seconds)
    error = None
    if job.status == "failed":
        error = FineTuningError("job_failed", job.error or job.message or "the job failed")
    finished = job.status in ("success", "failed", "cancelled")
    return FineTuningJob(
        id=openai_job_id(job.job_id),
        created_at=int(job.created_at),
        model=spec.request.base_model,
        status=STATUSES.get(job.status, job.status),
        hyperparameters=hyperparameters,
        method=_method(params, hyperparameters),
        seed=params.seed,
        training_file=origin.training_file if origin else None,
        validation_file=origin.validation_file if origin else None,
        fine_tuned_model=job.model_id if job.status == "success" else None,
        finished_at=int(job.finished_at) if finished and job.finished_at else None,
        trained_tokens=job.progress.trained_tokens if job.status == "success" else None,
        estimated_finish=estimated,
        error=error,
        metadata=origin.metadata if origin else None,
        user_provided_suffix=origin.suffix if origin else spec.request.suffix,
    )


async def create_job(request: Request) -> Response:
    service = request.app.state.service
    create = decode(create_decoder, await read_body(request))
    job = await run_in_threadpool(service.openai_finetune, create)
    return respond(job_object(job, service.store.spec(job.job_id)))


async def list_jobs(request: Request) -> Response:
    service = request.app.state.service
    after = request.query_params.get("after")
    metadata = {}
    for key, value in request.query_params.multi_items():
        if match := _METADATA.fullmatch(key):
            metadata[match.group(1)] = value
    found, more = await run_in_threadpool(
        service.finetune_jobs, _limit(request, 100), our_job_id(after) if after else None, metadata
    )
    return respond(FineTuningJobList([job_object(job, spec) for job, spec in found], more))


async def get_job(request: Request) -> Response:
    service = request.app.state.service
    job, spec = await run_in_threadpool(service.finetune_job, our_job_id(request.path_params["job_id"]))
    return respond(job_object(job, spec))


async def cancel_job(request: Request) -> Response:
    return await _stop(request, pause=False)


async def pause_job(request: Request) -> Response:
    return await _stop(request, pause=True)


async def _stop(request: Request, pause: bool) -> Response:
    service = request.app.state.service
    job_id = our_job_id(request.path_params["job_id"])
    await run_in_threadpool(service.finetune_job, job_id)
    job = await run_in_threadpool(service.cancel, job_id, pause)
    return respond(job_object(job, service.store.spec(job_id)))


async def resume_job(request: Request) -> Response:
    service = request.app.state.service
    job_id = our_job_id(request.path_params["job_id"])
    await run_in_threadpool(service.finetune_job, job_id)
    job = await run_in_threadpool(service.resume, job_id)
    return respond(job_object(job, service.store.spec(job_id)))


# -- events and checkpoints ----------------------------------------------------------------

_PLAIN = {
    "queued": "Job queued",
    "running": "Fine-tuning job started",
    "success": "The job has successfully completed",
    "cancelled": "The job was cancelled",
    "paused": "The job was paused",
    "resumed": "The job resumed from its last checkpoint",
    "loading": "Loading the base model",
    "downloading": "Downloading the base model",
}


def event_object(event: dict[str, Any], total: int | None) -> FineTuningEvent | None:
    """One of the job's events as OpenAI's; None for the ones of no use to its clients."""
    kind, seq, created = event["type"], event["seq"], int(event["time"])
    ident = f"ftevent-{seq}"
    of = f"/{total}" if total else ""
    if kind == "train":
        data = {
            "step": event["iteration"],
            "total_steps": total,
            "train_loss": event["train_loss"],
            "learning_rate": event.get("learning_rate"),
            "tokens_per_second": event.get("tokens_per_second"),
            "epoch": event.get("epoch"),
            **{k: event[k] for k in PREFERENCE_METRICS if k in event},
        }
        message = f"Step {event['iteration']}{of}: training loss={event['train_loss']:.4f}"
        return FineTuningEvent(ident, created, "info", message, "metrics", data)
    if kind == "val":
        data = {"step": event["iteration"], "total_steps": total, "valid_loss": event["val_loss"]}
        data |= {f"valid_{k}": event[f"val_{k}"] for k in PREFERENCE_METRICS if f"val_{k}" in event}
        message = f"Step {event['iteration']}{of}: validation loss={event['val_loss']:.4f}"
        return FineTuningEvent(ident, created, "info", message, "metrics", data)
    if kind == "retention":
        data = {
            "step": event.get("iteration"),
            "retention": event["retention"],
            "retention_answers_kept": event.get("retention_answers_kept"),
        }
        where = f"Step {event['iteration']}{of}: " if event.get("iteration") else ""
        message = f"{where}retention={event['retention']:.2f} (of the base's answers to general prompts)"
        return FineTuningEvent(ident, created, "info", message, "metrics", data)
    if kind == "checkpoint":
        message = f"Checkpoint created at step {event['iteration']}"
        return FineTuningEvent(ident, created, "info", message)
    if kind == "warning":
        return FineTuningEvent(ident, created, "warn", event["message"])
    if kind == "failed":
        return FineTuningEvent(ident, created, "error", event.get("error") or event.get("message") or "the job failed")
    if kind == "started":
        return FineTuningEvent(
            ident, created, "info", f"Training {event['samples']} samples for {event['epochs']} epochs"
        )
    if kind in _PLAIN:
        return FineTuningEvent(ident, created, "info", event.get("message") or _PLAIN[kind])
    if kind in ("info", "requeued"):
        return FineTuningEvent(ident, created, "info", event["message"])
    return None


async def list_events(request: Request) -> Response:
    """Newest first, as OpenAI lists them; `after` is an event id, `limit` at most 100."""
    service = request.app.state.service
    job_id = our_job_id(request.path_params["job_id"])
    job, _ = await run_in_threadpool(service.finetune_job, job_id)
    events = await run_in_threadpool(service.events, job_id)
    converted = [e for e in (event_object(ev, job.progress.total_iterations) for ev in events) if e is not None]
    converted.reverse()
    page, more = _page(request, converted, "event")
    return respond(FineTuningEventList(page, more))


async def list_checkpoints(request: Request) -> Response:
    """The job's checkpoints, newest first; each `fine_tuned_model_checkpoint` is a model
    that `/v1/chat/completions` and `/generate` take."""
    service = request.app.state.service
    job_id = our_job_id(request.path_params["job_id"])
    job, _ = await run_in_threadpool(service.finetune_job, job_id)
    train, saved = {}, {}
    for event in await run_in_threadpool(service.events, job_id):
        if event["type"] == "train":
            train[event["iteration"]] = event["train_loss"]
        elif event["type"] == "checkpoint":
            saved[event["iteration"]] = int(event["time"])
    data = []
    for checkpoint in reversed(job.checkpoints):
        step = checkpoint.iteration
        metrics: dict[str, float] = {"step": float(step)}
        if step in train:
            metrics["train_loss"] = train[step]
        if checkpoint.val_loss is not None:
            metrics["valid_loss"] = checkpoint.val_loss
        data.append(
            FineTuningCheckpoint(
                id=checkpoint_id(job_id, step),
                created_at=saved.get(step, int(job.created_at)),
                fine_tuned_model_checkpoint=f"{job.model_id}:step-{step}",
                fine_tuning_job_id=openai_job_id(job_id),
                step_number=step,
                metrics=metrics,
            )
        )
    page, more = _page(request, data, "checkpoint")
    return respond(FineTuningCheckpointList(page, more, page[0].id if page else None, page[-1].id if page else None))


def _page(request: Request, items: list[T], what: str, most: int = 100) -> tuple[list[T], bool]:
    """OpenAI's cursor paging: the items after the one whose id is `?after=`, `?limit=` of them
    (20 unless asked), and whether there are more."""
    after = request.query_params.get("after")
    if after:
        ids = [item.id for item in items]  # type: ignore[attr-defined]  # every OpenAI object has one
        if after not in ids:
            raise errors.NotFound(f"no {what} with id {after!r} here", param="after")
        items = items[ids.index(after) + 1 :]
    limit = _limit(request, most)
    return items[:limit], len(items) > limit


def _limit(request: Request, most: int) -> int:
    raw = request.query_params.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise errors.Invalid(f"`limit` must be a whole number from 1 to {most}, not {raw!r}", param="limit")
    return int(raw)
