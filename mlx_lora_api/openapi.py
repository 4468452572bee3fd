"""The OpenAPI 3.1 description, generated from the msgspec schemas the handlers decode with."""

from __future__ import annotations

from typing import Any

import msgspec

from . import __version__
from . import schemas as s

JSON = "application/json"
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": r"^job-[0-9a-f]{12}$"}}
MODEL_ID = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 96}}
WAIT = {
    "name": "wait",
    "in": "query",
    "description": "block until the job ends; answer 200 on success",
    "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
}


def _query(name: str, schema: dict, description: str = "") -> dict:
    return {"name": name, "in": "query", "description": description, "schema": schema}


# (method, path, summary, request body type, {status: response type or media type}, parameters)
ROUTES: list[tuple[str, str, str, Any, dict, list]] = [
    ("post", "/lora-finetune", "Queue a LoRA fine-tune", s.FinetuneRequest, {"202": s.Accepted, "200": s.Accepted}, [WAIT]),
    ("post", "/lora-fuse", "Queue fusing an adapter into its base", s.FuseRequest, {"202": s.Accepted, "200": s.Accepted}, [WAIT]),
    ("get", "/jobs", "List jobs, newest first", None, {"200": s.JobList}, [
        _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
        _query("before", {"type": "integer", "minimum": 0}, "the `next_before` of the previous page"),
        _query("status", {"type": "string", "enum": ["queued", "running", "success", "failed", "cancelled"]}),
    ]),
    ("get", "/jobs/{job_id}", "One job: status, progress, checkpoints", None, {"200": s.Job}, [JOB_ID]),
    ("post", "/jobs/{job_id}/cancel", "Cancel a queued or running job", None, {"200": s.Job}, [JOB_ID]),
    ("post", "/jobs/{job_id}/resume", "Resume a failed or cancelled fine-tune from its last checkpoint", None,
     {"202": s.Job}, [JOB_ID]),
    ("get", "/jobs/{job_id}/events", "The job's events as Server-Sent Events", None, {"200": "text/event-stream"}, [JOB_ID]),
    ("get", "/jobs/{job_id}/metrics", "The loss history", None, {"200": s.Metrics}, [JOB_ID]),
    ("get", "/jobs/{job_id}/loss.svg", "The loss curves as a picture", None, {"200": "image/svg+xml"}, [JOB_ID]),
    ("get", "/models", "List base models, adapters and fused models", None, {"200": s.ModelList}, [
        _query("kind", {"type": "string", "enum": ["base", "adapter", "fused"]}),
        _query("base", {"type": "string"}),
    ]),
    ("get", "/models/{model_id}", "One model's full record", None, {"200": s.ModelRecord}, [MODEL_ID]),
    ("delete", "/models/{model_id}", "Delete a model or adapter", None, {"200": s.Deleted}, [
        MODEL_ID, _query("force", {"type": "string", "enum": ["true", "false"]}),
    ]),
    ("post", "/models/{model_id}/quantize", "Queue quantizing a model", s.QuantizeRequest, {"202": s.Accepted}, [MODEL_ID]),
    ("post", "/models/{model_id}/export", "Queue a GGUF export", s.ExportRequest, {"202": s.Accepted}, [MODEL_ID]),
    ("post", "/models/{model_id}/push", "Queue a push to the Hugging Face Hub", s.PushRequest, {"202": s.Accepted}, [MODEL_ID]),
    ("post", "/generate", "Generate with a base, adapter or fused model", s.GenerateRequest,
     {"200": s.GenerateResponse}, []),
    ("get", "/v1/models", "OpenAI-compatible model list", None, {"200": s.OpenAIModelList}, []),
    ("post", "/v1/chat/completions", "OpenAI-compatible chat completions", s.ChatCompletionRequest,
     {"200": s.ChatCompletion}, []),
    ("get", "/health", "Liveness and queue length", None, {"200": s.Health}, []),
]


def build() -> dict:
    types = sorted(
        {t for _, _, _, body, answers, _ in ROUTES for t in [body, *answers.values()] if isinstance(t, type)}
        | {s.ErrorBody, s.OpenAIError},
        key=lambda t: t.__name__,
    )
    refs, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    ref = dict(zip(types, refs))
    paths: dict[str, dict] = {}
    for method, path, summary, body, answers, parameters in ROUTES:
        operation: dict[str, Any] = {"summary": summary, "parameters": parameters, "responses": {}}
        if body is not None:
            operation["requestBody"] = {"required": True, "content": {JSON: {"schema": ref[body]}}}
        for status, answer in answers.items():
            if isinstance(answer, str):
                content = {answer: {"schema": {"type": "string"}}}
            else:
                content = {JSON: {"schema": ref[answer]}}
            operation["responses"][status] = {"description": summary, "content": content}
        error = s.OpenAIError if path.startswith("/v1/") else s.ErrorBody
        operation["responses"]["default"] = {
            "description": "an error: what is wrong and where",
            "content": {JSON: {"schema": ref[error]}},
        }
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "mlx-lora-api", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
