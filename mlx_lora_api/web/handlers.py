"""The service's own handlers, small: decode, call the service off the event loop, encode.
The table that maps routes to them is `routes.py`."""

from __future__ import annotations

import asyncio
import json
import logging

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .. import __version__, errors
from ..types import (
    FINISHED,
    AdapterImportRequest,
    ExportRequest,
    FinetuneRequest,
    FuseRequest,
    GenerateRequest,
    Job,
    PushRequest,
    QuantizeRequest,
)
from . import plots
from .bodies import Accepted, Deleted, GenerateResponse, Health, ModelList, Usage
from .codec import decode, read_body, respond, sse

log = logging.getLogger("mlx_lora_api")
finetune_decoder = msgspec.json.Decoder(FinetuneRequest)
fuse_decoder = msgspec.json.Decoder(FuseRequest)
quantize_decoder = msgspec.json.Decoder(QuantizeRequest)
export_decoder = msgspec.json.Decoder(ExportRequest)
import_decoder = msgspec.json.Decoder(AdapterImportRequest)
push_decoder = msgspec.json.Decoder(PushRequest)
generate_decoder = msgspec.json.Decoder(GenerateRequest)


def flag(request: Request, name: str) -> bool:
    """A true/false query parameter (`true`, `false`, `1` or `0`, as the OpenAPI document says)."""
    value = request.query_params.get(name, "false")
    if value not in ("true", "false", "1", "0"):
        raise errors.Invalid(f"query parameter `{name}` must be true or false, not {value!r}")
    return value in ("true", "1")


def wait_timeout(request: Request) -> float | None:
    raw = request.query_params.get("timeout")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 86_400:
        raise errors.Invalid(f"query parameter `timeout` must be a number of seconds from 0 to 86400, not {raw!r}")
    return seconds


async def wait_for(request: Request, job_id: str, timeout: float | None) -> Job | None:
    """The job once it has ended, or as it is when `timeout` passes; None if the client left."""
    service = request.app.state.service
    interval = request.app.state.settings.wait_poll_interval
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    while True:
        job = await run_in_threadpool(service.job, job_id)
        if job.status in FINISHED or (deadline is not None and asyncio.get_running_loop().time() >= deadline):
            return job
        if await request.is_disconnected():
            return None  # nobody to answer; the job goes on
        await asyncio.sleep(interval)


async def _submit(request: Request, decoder, make_spec, noun: str) -> Response:
    service = request.app.state.service
    wait = flag(request, "wait")
    timeout = wait_timeout(request)
    payload = decode(decoder, await read_body(request))
    spec = await run_in_threadpool(make_spec(service), payload)
    job = await run_in_threadpool(service.submit, spec)
    if not wait:
        message = f"{noun} queued as job {job.job_id}; follow it at GET /jobs/{job.job_id}"
        return respond(Accepted("queued", job.model_id, message, job.job_id), 202)
    waited = await wait_for(request, job.job_id, timeout)
    if waited is None:
        log.info("job %s: the client waiting for it hung up; the job goes on", job.job_id)
        return Response(status_code=499)  # nobody reads this
    job = waited
    if job.status not in FINISHED:
        message = f"{noun} is {job.status} after {timeout} s; follow it at GET /jobs/{job.job_id}"
        return respond(Accepted(job.status, job.model_id, message, job.job_id), 202)
    if job.status == "success":
        return respond(Accepted("success", job.model_id, job.message or f"{noun} finished", job.job_id))
    code = 409 if job.status in ("cancelled", "paused") else 500
    return respond(Accepted(job.status, job.model_id, job.error or job.message or job.status, job.job_id), code)


async def finetune(request: Request) -> Response:
    return await _submit(request, finetune_decoder, lambda s: s.finetune_spec, "fine-tune")


async def fuse(request: Request) -> Response:
    return await _submit(request, fuse_decoder, lambda s: s.fuse_spec, "fuse")


def _int_param(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:  # isdigit alone takes '²'
        raise errors.Invalid(f"query parameter `{name}` must be a whole number from {low} to {high}, not {raw!r}")
    return int(raw)


async def list_jobs(request: Request) -> Response:
    limit = _int_param(request, "limit", 20, 1, 500)
    before = _int_param(request, "before", None, 0, 2**62)
    status = request.query_params.get("status")
    if status is not None and status not in ("queued", "running", *FINISHED):
        raise errors.Invalid(f"query parameter `status` {status!r} is not a job status")
    service = request.app.state.service
    return respond(await run_in_threadpool(service.jobs, limit, before, status))


async def get_job(request: Request) -> Response:
    service = request.app.state.service
    return respond(await run_in_threadpool(service.job_details, request.path_params["job_id"]))


async def cancel_job(request: Request) -> Response:
    service = request.app.state.service
    return respond(await run_in_threadpool(service.cancel, request.path_params["job_id"]))


async def pause_job(request: Request) -> Response:
    service = request.app.state.service
    return respond(await run_in_threadpool(service.cancel, request.path_params["job_id"], True))


async def resume_job(request: Request) -> Response:
    service = request.app.state.service
    return respond(await run_in_threadpool(service.resume, request.path_params["job_id"]), 202)


async def job_events(request: Request) -> Response:
    """Server-Sent Events: the job's past events first (those after `Last-Event-ID` for a client
    that reconnects), then live ones; a keep-alive comment while nothing happens (a job waiting
    in the queue); the stream ends after the job's final event."""
    service = request.app.state.service
    job_id = request.path_params["job_id"]
    await run_in_threadpool(service.job, job_id)  # 404 before the stream starts
    settings = request.app.state.settings
    last_seen = _last_event_id(request) or 0

    async def stream():
        after, last_type = last_seen, None
        clock = asyncio.get_running_loop().time
        quiet_since = clock()
        while True:
            events = await run_in_threadpool(service.events, job_id, after)
            for event in events:
                after, last_type = event["seq"], event["type"]
                yield f"id: {after}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
            if events:
                quiet_since = clock()
            if last_type in FINISHED or (last_type is None and after):
                job = await run_in_threadpool(service.job, job_id)
                if job.status in FINISHED and not await run_in_threadpool(service.events, job_id, after):
                    return  # the final event is out (or was seen before the client reconnected)
            if clock() - quiet_since >= settings.sse_keepalive_seconds:
                yield ": keep-alive\n\n"
                quiet_since = clock()
            await asyncio.sleep(settings.wait_poll_interval)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def all_job_events(request: Request) -> Response:
    """Server-Sent Events of every job, each with its `job_id`: those after `Last-Event-ID` (the
    `latest_event` of `GET /jobs`, so that nothing between the list and the stream is missed), or
    from now on. The stream does not end; a keep-alive comment while nothing happens."""
    service = request.app.state.service
    settings = request.app.state.settings
    start = _last_event_id(request)
    if start is None:
        start = await run_in_threadpool(service.latest_event)

    async def stream():
        after = start
        clock = asyncio.get_running_loop().time
        quiet_since = clock()
        while True:
            events = await run_in_threadpool(service.all_events, after)
            for event in events:
                after = event["seq"]
                yield f"id: {after}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
            if events:
                quiet_since = clock()
            elif clock() - quiet_since >= settings.sse_keepalive_seconds:
                yield ": keep-alive\n\n"
                quiet_since = clock()
            await asyncio.sleep(settings.wait_poll_interval)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _last_event_id(request: Request) -> int | None:
    value = request.headers.get("last-event-id", "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()):
        raise errors.Invalid(f"header `Last-Event-ID` must be an event id this stream sent, not {value!r}")
    return int(value)


async def list_models(request: Request) -> Response:
    kind = request.query_params.get("kind")
    if kind is not None and kind not in ("base", "adapter", "fused"):
        raise errors.Invalid(f"query parameter `kind` must be base, adapter or fused, not {kind!r}")
    base = request.query_params.get("base")
    service = request.app.state.service
    return respond(ModelList(await run_in_threadpool(service.list_models, kind, base)))


async def get_model(request: Request) -> Response:
    registry = request.app.state.service.registry
    return respond(await run_in_threadpool(registry.record, request.path_params["model_id"]))


async def _model_job(request: Request, decoder, make_spec, noun: str) -> Response:
    service = request.app.state.service
    model_id = request.path_params["model_id"]
    body = await read_body(request)
    payload = decode(decoder, body if body.strip() else b"{}")  # no body: every default (push has none for repo_id)
    spec = await run_in_threadpool(make_spec(service), model_id, payload)
    job = await run_in_threadpool(service.submit, spec)
    message = f"{noun} of {model_id} queued as job {job.job_id}; follow it at GET /jobs/{job.job_id}"
    return respond(Accepted("queued", job.model_id, message, job.job_id), 202)


async def quantize_model(request: Request) -> Response:
    return await _model_job(request, quantize_decoder, lambda s: s.quantize_spec, "quantization")


async def export_model(request: Request) -> Response:
    return await _model_job(request, export_decoder, lambda s: s.export_spec, "export")


async def push_model(request: Request) -> Response:
    return await _model_job(request, push_decoder, lambda s: s.push_spec, "push")


async def check_dataset(request: Request) -> Response:
    service = request.app.state.service
    payload = decode(finetune_decoder, await read_body(request))
    return respond(await run_in_threadpool(service.check_dataset, payload))


async def import_adapter(request: Request) -> Response:
    service = request.app.state.service
    payload = decode(import_decoder, await read_body(request))
    return respond(await run_in_threadpool(service.import_peft, payload), status_code=201)


async def delete_model(request: Request) -> Response:
    force = flag(request, "force")
    service = request.app.state.service
    model_id = request.path_params["model_id"]
    await run_in_threadpool(service.delete_model, model_id, force)
    return respond(Deleted("deleted", model_id))


async def job_metrics(request: Request) -> Response:
    service = request.app.state.service
    return respond(await run_in_threadpool(service.metrics, request.path_params["job_id"]))


async def job_loss_svg(request: Request) -> Response:
    service = request.app.state.service
    job_id = request.path_params["job_id"]
    job = await run_in_threadpool(service.job, job_id)
    metrics = await run_in_threadpool(service.metrics, job_id)
    series = {
        "train": [(m.iteration, m.train_loss) for m in metrics.train],
        "validation": [(m.iteration, m.val_loss) for m in metrics.validation],
    }
    return Response(plots.loss_svg(f"{job.model_id} ({job.status})", series), media_type="image/svg+xml")


async def generate(request: Request) -> Response:
    payload = decode(generate_decoder, await read_body(request))
    service = request.app.state.service
    if not payload.stream:
        text, end = await run_in_threadpool(service.generate_text, payload)
        usage = Usage.of(end)
        return respond(GenerateResponse(payload.model, text, end["finish_reason"], usage))
    events = await run_in_threadpool(service.generate, payload)

    def stream():
        for event in events:
            kind = event.pop("type")
            yield sse(event, "text" if kind == "text" else kind)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def health(request: Request) -> Response:
    """Liveness with its reasons: the runner, the database, a worker's start; 503 when one fails."""
    service = request.app.state.service
    queued = await run_in_threadpool(service.store.count, "queued")
    running = await run_in_threadpool(service.store.count, "running")
    found = await run_in_threadpool(service.health)
    status = "unavailable" if found["problems"] else "ok"
    body = msgspec.convert(
        {"status": status, "version": __version__, "queued_jobs": queued, "running_jobs": running, **found}, Health
    )
    return respond(body, 503 if found["problems"] else 200)
