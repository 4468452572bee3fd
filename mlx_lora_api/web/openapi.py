"""The OpenAPI 3.1 description, generated from the route table (`routes.ENDPOINTS`) and the
msgspec types its handlers decode and encode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
from starlette.requests import Request

from .. import __version__
from ..types import PARAMETER_HELP, SAMPLE_FORMS
from .bodies import ErrorBody, OpenAIError

JSON = "application/json"


class Endpoint(NamedTuple):
    method: str
    path: str
    handler: Callable[[Request], Any]
    summary: str | None  # None: served, not described (the description itself)
    body: type | dict[str, Any] | None = None  # a type: JSON; a dict: a multipart/form-data schema
    answers: dict[str, Any] = {}  # noqa: RUF012 (never mutated) status: a type, or a media type
    parameters: list[dict[str, Any]] = []  # noqa: RUF012 (never mutated)


def operation_id(endpoint: Endpoint) -> str:
    name = getattr(endpoint.handler, "__name__", "handler")
    return f"openai_{name}" if endpoint.handler.__module__.endswith((".openai", ".fine_tuning")) else name


def _links(answer: type) -> dict[str, Any]:
    """OpenAPI links from an answer that names a job or a model to what can be done with them
    (a client, or schemathesis's stateful run, follows them)."""
    job = {"job_id": "$response.body#/job_id"}
    model = {"model_id": "$response.body#/model_id"}
    links: dict[str, Any] = {}
    if answer.__name__ in ("Accepted", "Job"):
        for op in ("get_job", "cancel_job", "resume_job", "job_metrics"):
            links[op] = {"operationId": op, "parameters": job}
    if answer.__name__ in ("Accepted", "Job", "ModelRecord", "Deleted"):
        for op in ("get_model", "delete_model", "quantize_model", "export_model"):
            links[op] = {"operationId": op, "parameters": model}
    return links


def build(endpoints: list[Endpoint]) -> dict[str, Any]:
    """The description of every endpoint that has a summary."""
    described = [e for e in endpoints if e.summary is not None]
    types = sorted(
        {t for e in described for t in [e.body, *e.answers.values()] if isinstance(t, type)} | {ErrorBody, OpenAIError},
        key=lambda t: t.__name__,
    )
    refs, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    ref = dict(zip(types, refs))
    if "Sample" in components:
        components["Sample"] |= SAMPLE_FORMS
    for name, schema in components.get("Parameters", {}).get("properties", {}).items():
        schema["description"] = PARAMETER_HELP[name]  # README's meaning, for clients and the dashboard
    paths: dict[str, dict] = {}
    for method, path, handler, summary, body, answers, parameters in described:
        operation: dict[str, Any] = {
            "operationId": operation_id(Endpoint(method, path, handler, summary)),
            "summary": summary,
            "parameters": parameters,
            "responses": {},
        }
        if isinstance(body, dict):
            operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": body}}}
        elif body is not None:
            operation["requestBody"] = {"required": True, "content": {JSON: {"schema": ref[body]}}}
        for status, answer in answers.items():
            if answer == "text/event-stream":  # each event: `id`, `event` (its type) and `data` (JSON)
                event = {"type": "object", "properties": {k: {"type": "string"} for k in ("id", "event", "data")}}
                content = {answer: {"schema": event}}
            elif isinstance(answer, str):
                content = {answer: {"schema": {"type": "string"}}}
            else:
                content = {JSON: {"schema": ref[answer]}}
            operation["responses"][status] = {"description": summary, "content": content}
            if not isinstance(answer, str) and (links := _links(answer)):
                operation["responses"][status]["links"] = links
        error = OpenAIError if path.startswith("/v1/") else ErrorBody
        operation["responses"]["default"] = {
            "description": "an error: what is wrong and where",
            "content": {JSON: {"schema": ref[error]}},
        }
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "mlx-lora-api", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
