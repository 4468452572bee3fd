"""Bytes in and out: reading a body within the size limit, decoding it into a type with errors
that name the field, and encoding answers (JSON, Server-Sent Events)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from .. import errors

T = TypeVar("T")
encoder = msgspec.json.Encoder()


def respond(obj: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(encoder.encode(obj), status_code=status_code, media_type="application/json", headers=headers)


async def read_body(request: Request) -> bytes:
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise errors.PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise errors.PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
    return bytes(body)


def decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    if not body.strip():
        raise errors.BadRequest("the request body is empty; send a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        raise errors.Invalid(f"invalid request: {e}") from e
    except msgspec.DecodeError as e:
        raise errors.BadRequest(f"malformed JSON: {e}") from e


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else encoder.encode(data).decode()}\n\n"
