"""The OpenAPI 3.1 description, generated from the route table (`routes.ENDPOINTS`) and the
msgspec types its handlers decode and encode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
from starlette.requests import Request

from .. import __version__
from .bodies import ErrorBody, OpenAIError

JSON = "application/json"


class Endpoint(NamedTuple):
    method: str
    path: str
    handler: Callable[[Request], Any]
    summary: str | None  # None: served, not described (the description itself)
    body: type | None = None
    answers: dict[str, Any] = {}  # noqa: RUF012 (never mutated) status: a type, or a media type
    parameters: list[dict[str, Any]] = []  # noqa: RUF012 (never mutated)


def build(endpoints: list[Endpoint]) -> dict[str, Any]:
    """The description of every endpoint that has a summary."""
    described = [e for e in endpoints if e.summary is not None]
    types = sorted(
        {t for e in described for t in [e.body, *e.answers.values()] if isinstance(t, type)} | {ErrorBody, OpenAIError},
        key=lambda t: t.__name__,
    )
    refs, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    ref = dict(zip(types, refs))
    paths: dict[str, dict] = {}
    for method, path, _, summary, body, answers, parameters in described:
        operation: dict[str, Any] = {"summary": summary, "parameters": parameters, "responses": {}}
        if body is not None:
            operation["requestBody"] = {"required": True, "content": {JSON: {"schema": ref[body]}}}
        for status, answer in answers.items():
            if isinstance(answer, str):
                content = {answer: {"schema": {"type": "string"}}}
            else:
                content = {JSON: {"schema": ref[answer]}}
            operation["responses"][status] = {"description": summary, "content": content}
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
