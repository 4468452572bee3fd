"""OpenAI-compatible endpoints over the same models: GET /v1/models, POST /v1/chat/completions."""

from __future__ import annotations

import secrets
import time

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..types import GenerateRequest
from .bodies import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    OpenAIError,
    OpenAIErrorDetail,
    OpenAIModel,
    OpenAIModelList,
    Usage,
)
from .codec import decode, read_body, respond, sse

decoder = msgspec.json.Decoder(ChatCompletionRequest)


def error_body(status_code: int, message: str, param: str | None = None) -> OpenAIError:
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return OpenAIError(OpenAIErrorDetail(message, kind, status_code, param))


async def list_models(request: Request) -> Response:
    registry = request.app.state.service.registry
    records = await run_in_threadpool(registry.list_models)
    return respond(OpenAIModelList([OpenAIModel(r.model_id, int(r.created_at)) for r in records]))


async def chat_completions(request: Request) -> Response:
    payload = decode(decoder, await read_body(request))
    stop = [payload.stop] if isinstance(payload.stop, str) else payload.stop
    call = GenerateRequest(
        model=payload.model,
        messages=payload.messages,
        max_tokens=payload.max_completion_tokens or payload.max_tokens or 512,
        temperature=payload.temperature,
        top_p=payload.top_p,
        seed=payload.seed,
        stop=stop,
    )
    service = request.app.state.service
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    if not payload.stream:
        text, end = await run_in_threadpool(service.generate_text, call)
        usage = Usage.of(end)
        choice = ChatChoice(0, ChatMessage("assistant", text), end["finish_reason"])
        return respond(ChatCompletion(completion_id, created, payload.model, [choice], usage))
    events = await run_in_threadpool(service.generate, call)

    include_usage = payload.stream_options is not None and payload.stream_options.include_usage

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": payload.model,
            "choices": choices,
        }
        if include_usage:  # as OpenAI's: null on every chunk but the last, which has no choices
            body["usage"] = usage
        return sse(body)

    def only(delta: dict, finish: str | None = None) -> list[dict]:  # the one choice (n is 1)
        return [{"index": 0, "delta": delta, "finish_reason": finish}]

    def stream():
        yield chunk(only({"role": "assistant", "content": ""}))
        for event in events:
            if event["type"] == "text":
                yield chunk(only({"content": event["text"]}))
            elif event["type"] == "error":
                yield sse(error_body(500, event["message"]))
                return
            else:
                yield chunk(only({}, event["finish_reason"]))
                if include_usage:
                    yield chunk([], msgspec.to_builtins(Usage.of(event)))
        yield sse("[DONE]")

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
