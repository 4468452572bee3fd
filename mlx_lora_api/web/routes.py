"""The one route table: each entry is the router's route and the OpenAPI operation both."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .. import openai_jobs
from .. import types as t
from . import bodies as b
from . import dashboard, fine_tuning, handlers, openai, openapi
from .codec import encoder
from .openapi import Endpoint

JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": r"^job-[0-9a-f]{12}$"},
}
MODEL_ID = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 96}}
WAIT = {
    "name": "wait",
    "in": "query",
    "description": "block until the job ends; answer 200 on success",
    "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
}
TIMEOUT = {
    "name": "timeout",
    "in": "query",
    "description": "with wait: give up waiting after this many seconds and answer 202 with the job's status",
    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
}


FT_JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": r"^ftjob-[0-9a-f]{12}$"},
}
FILE_ID = {
    "name": "file_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": r"^file-[0-9a-f]{24}$"},
}
UPLOAD = {
    "type": "object",
    "required": ["file", "purpose"],
    "properties": {
        "file": {"type": "string", "contentMediaType": "application/octet-stream", "description": "JSONL samples"},
        "purpose": {"type": "string", "enum": ["fine-tune"]},
    },
}
LIMIT = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}}
AFTER = {"name": "after", "in": "query", "schema": {"type": "string"}}


def query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "description": description, "schema": schema}


async def openapi_json(request: Request) -> Response:
    if not hasattr(request.app.state, "openapi"):
        request.app.state.openapi = encoder.encode(openapi.build(ENDPOINTS))
    return Response(request.app.state.openapi, media_type="application/json")


ENDPOINTS = [
    Endpoint(
        "POST",
        "/lora-finetune",
        handlers.finetune,
        "Queue a LoRA fine-tune",
        t.FinetuneRequest,
        {"202": b.Accepted, "200": b.Accepted},
        [WAIT, TIMEOUT],
    ),
    Endpoint(
        "POST",
        "/datasets/check",
        handlers.check_dataset,
        "What a fine-tune would train on and cost: tokens, steps, estimated time and peak memory",
        t.FinetuneRequest,
        {"200": t.DatasetCheck},
    ),
    Endpoint(
        "POST",
        "/lora-fuse",
        handlers.fuse,
        "Queue fusing an adapter into its base",
        t.FuseRequest,
        {"202": b.Accepted, "200": b.Accepted},
        [WAIT, TIMEOUT],
    ),
    Endpoint(
        "GET",
        "/jobs",
        handlers.list_jobs,
        "List jobs, newest first",
        None,
        {"200": t.JobList},
        [
            query("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
            query("before", {"type": "integer", "minimum": 0}, "the `next_before` of the previous page"),
            query(
                "status",
                {"type": "string", "enum": ["queued", "running", "success", "failed", "cancelled", "paused"]},
            ),
        ],
    ),
    Endpoint(
        "GET",
        "/jobs/events",
        handlers.all_job_events,
        "Every job's events, live (Server-Sent Events); after Last-Event-ID, else from now",
        None,
        {"200": "text/event-stream"},
    ),
    Endpoint(
        "GET",
        "/jobs/{job_id}",
        handlers.get_job,
        "One job: status, progress, checkpoints",
        None,
        {"200": t.Job},
        [JOB_ID],
    ),
    Endpoint(
        "POST",
        "/jobs/{job_id}/cancel",
        handlers.cancel_job,
        "Cancel a queued or running job",
        None,
        {"200": t.Job},
        [JOB_ID],
    ),
    Endpoint(
        "POST",
        "/jobs/{job_id}/pause",
        handlers.pause_job,
        "Pause a queued or running job (as cancel, but `paused`; resume goes on from its last checkpoint)",
        None,
        {"200": t.Job},
        [JOB_ID],
    ),
    Endpoint(
        "POST",
        "/jobs/{job_id}/resume",
        handlers.resume_job,
        "Resume a failed, cancelled or paused fine-tune from its last checkpoint",
        None,
        {"202": t.Job},
        [JOB_ID],
    ),
    Endpoint(
        "GET",
        "/jobs/{job_id}/events",
        handlers.job_events,
        "The job's events as Server-Sent Events",
        None,
        {"200": "text/event-stream"},
        [JOB_ID],
    ),
    Endpoint(
        "GET", "/jobs/{job_id}/metrics", handlers.job_metrics, "The loss history", None, {"200": t.Metrics}, [JOB_ID]
    ),
    Endpoint(
        "GET",
        "/jobs/{job_id}/loss.svg",
        handlers.job_loss_svg,
        "The loss curves as a picture",
        None,
        {"200": "image/svg+xml"},
        [JOB_ID],
    ),
    Endpoint(
        "GET",
        "/models",
        handlers.list_models,
        "List base models, adapters and fused models",
        None,
        {"200": b.ModelList},
        [
            query("kind", {"type": "string", "enum": ["base", "adapter", "fused"]}),
            query("base", {"type": "string"}),
        ],
    ),
    Endpoint(
        "GET",
        "/models/{model_id}",
        handlers.get_model,
        "One model's full record",
        None,
        {"200": t.ModelRecord},
        [MODEL_ID],
    ),
    Endpoint(
        "POST",
        "/adapters/import",
        handlers.import_adapter,
        "Import a Hugging Face PEFT LoRA adapter (a folder or a Hub repo id) as an adapter",
        t.AdapterImportRequest,
        {"201": t.ModelRecord},
    ),
    Endpoint(
        "DELETE",
        "/models/{model_id}",
        handlers.delete_model,
        "Delete a model or adapter",
        None,
        {"200": b.Deleted},
        [MODEL_ID, query("force", {"type": "string", "enum": ["true", "false", "1", "0"]})],
    ),
    Endpoint(
        "POST",
        "/models/{model_id}/quantize",
        handlers.quantize_model,
        "Queue quantizing a model",
        t.QuantizeRequest,
        {"202": b.Accepted},
        [MODEL_ID],
    ),
    Endpoint(
        "POST",
        "/models/{model_id}/export",
        handlers.export_model,
        "Queue a GGUF export",
        t.ExportRequest,
        {"202": b.Accepted},
        [MODEL_ID],
    ),
    Endpoint(
        "POST",
        "/models/{model_id}/push",
        handlers.push_model,
        "Queue a push to the Hugging Face Hub",
        t.PushRequest,
        {"202": b.Accepted},
        [MODEL_ID],
    ),
    Endpoint(
        "POST",
        "/generate",
        handlers.generate,
        "Generate with a base, adapter or fused model",
        t.GenerateRequest,
        {"200": b.GenerateResponse},
    ),
    Endpoint("GET", "/v1/models", openai.list_models, "OpenAI-compatible model list", None, {"200": b.OpenAIModelList}),
    Endpoint(
        "POST",
        "/v1/chat/completions",
        openai.chat_completions,
        "OpenAI-compatible chat completions",
        b.ChatCompletionRequest,
        {"200": b.ChatCompletion},
    ),
    Endpoint(
        "POST",
        "/v1/files",
        fine_tuning.upload_file,
        "OpenAI-compatible upload of a JSONL data file",
        UPLOAD,
        {"200": b.FileObject},
    ),
    Endpoint(
        "GET",
        "/v1/files",
        fine_tuning.list_files,
        "OpenAI-compatible list of data files",
        None,
        {"200": b.FileList},
        [
            AFTER,
            query("limit", {"type": "integer", "minimum": 1, "maximum": 10000}),
            query("purpose", {"type": "string"}),
            query("order", {"type": "string", "enum": ["asc", "desc"]}),
        ],
    ),
    Endpoint(
        "GET",
        "/v1/files/{file_id}",
        fine_tuning.get_file,
        "OpenAI-compatible data file record",
        None,
        {"200": b.FileObject},
        [FILE_ID],
    ),
    Endpoint(
        "GET",
        "/v1/files/{file_id}/content",
        fine_tuning.file_content,
        "A data file's content",
        None,
        {"200": "application/jsonl"},
        [FILE_ID],
    ),
    Endpoint(
        "DELETE",
        "/v1/files/{file_id}",
        fine_tuning.delete_file,
        "Delete a data file",
        None,
        {"200": b.FileDeleted},
        [FILE_ID],
    ),
    Endpoint(
        "POST",
        "/v1/fine_tuning/jobs",
        fine_tuning.create_job,
        "OpenAI-compatible fine-tuning job",
        openai_jobs.JobCreate,
        {"200": b.FineTuningJob},
    ),
    Endpoint(
        "GET",
        "/v1/fine_tuning/jobs",
        fine_tuning.list_jobs,
        "OpenAI-compatible list of fine-tuning jobs",
        None,
        {"200": b.FineTuningJobList},
        [AFTER, LIMIT],
    ),
    Endpoint(
        "GET",
        "/v1/fine_tuning/jobs/{job_id}",
        fine_tuning.get_job,
        "One fine-tuning job",
        None,
        {"200": b.FineTuningJob},
        [FT_JOB_ID],
    ),
    Endpoint(
        "POST",
        "/v1/fine_tuning/jobs/{job_id}/cancel",
        fine_tuning.cancel_job,
        "Cancel a fine-tuning job",
        None,
        {"200": b.FineTuningJob},
        [FT_JOB_ID],
    ),
    Endpoint(
        "POST",
        "/v1/fine_tuning/jobs/{job_id}/pause",
        fine_tuning.pause_job,
        "Pause a fine-tuning job",
        None,
        {"200": b.FineTuningJob},
        [FT_JOB_ID],
    ),
    Endpoint(
        "POST",
        "/v1/fine_tuning/jobs/{job_id}/resume",
        fine_tuning.resume_job,
        "Resume a paused, cancelled or failed fine-tuning job from its last checkpoint",
        None,
        {"200": b.FineTuningJob},
        [FT_JOB_ID],
    ),
    Endpoint(
        "GET",
        "/v1/fine_tuning/jobs/{job_id}/events",
        fine_tuning.list_events,
        "A fine-tuning job's events, newest first",
        None,
        {"200": b.FineTuningEventList},
        [FT_JOB_ID, AFTER, LIMIT],
    ),
    Endpoint(
        "GET",
        "/v1/fine_tuning/jobs/{job_id}/checkpoints",
        fine_tuning.list_checkpoints,
        "A fine-tuning job's checkpoints, newest first",
        None,
        {"200": b.FineTuningCheckpointList},
        [FT_JOB_ID, AFTER, LIMIT],
    ),
    Endpoint("GET", "/health", handlers.health, "Liveness and queue length", None, {"200": b.Health}),
    Endpoint("GET", "/openapi.json", openapi_json, None),
]


def routes() -> list[BaseRoute]:
    """The API's routes, then the dashboard's page and its files."""
    api: list[BaseRoute] = [Route(e.path, e.handler, methods=[e.method]) for e in ENDPOINTS]
    return [*api, Route("/", dashboard.page, methods=["GET"]), dashboard.assets()]
