"""The bodies only HTTP has: acknowledgements, errors, health, and OpenAI's shapes.

Lenient where OpenAI's clients send fields this service has no use for (n=1, user, ...).
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from ..types import Message, ModelRecord, ModelRef


class Accepted(Struct):
    """The seed endpoints' answer; `job_id` was added later."""

    status: str
    model_id: str
    message: str
    job_id: str | None = None


class ErrorBody(Struct):
    message: str
    status: str = "error"


class ModelList(Struct):
    models: list[ModelRecord]


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(Struct):
    model: str
    text: str
    finish_reason: str
    usage: Usage


class ChatCompletionRequest(Struct, kw_only=True):
    model: ModelRef
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1, le=32_768)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1, le=32_768)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Meta(gt=0, le=1)] = 1.0
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: Annotated[int, Meta(ge=1, le=1)] = 1


class ChatMessage(Struct):
    role: str
    content: str


class ChatChoice(Struct):
    index: int
    message: ChatMessage
    finish_reason: str


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class OpenAIErrorDetail(Struct):
    message: str
    type: str
    code: int


class OpenAIError(Struct):
    error: OpenAIErrorDetail


class OpenAIModel(Struct):
    id: str
    created: int
    owned_by: str = "mlx-lora-api"
    object: str = "model"


class OpenAIModelList(Struct):
    data: list[OpenAIModel]
    object: str = "list"


class Health(Struct, omit_defaults=True):
    """`ok`, or `unavailable` (503) with `problems` saying what is wrong."""

    status: str
    version: str
    queued_jobs: int
    running_jobs: int
    problems: list[str] = []
    mlx: str | None = None
    mlx_lm: str | None = None
    device: str | None = None
    blas: str | None = None
    blas_kernels: str | None = None


class Deleted(Struct):
    status: str
    model_id: str
