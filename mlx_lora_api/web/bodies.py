"""The bodies only HTTP has: acknowledgements, errors, health, and OpenAI's shapes.

Lenient where OpenAI's clients send fields this service has no use for (n=1, user, ...).
"""

from __future__ import annotations

from typing import Annotated, Any

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


class PromptTokensDetails(Struct):
    cached_tokens: int  # of the prompt's, read from the keys and values kept from earlier answers


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails  # as OpenAI's API reports them

    @classmethod
    def of(cls, end: dict[str, Any]) -> Usage:
        """From a generation's end event."""
        prompt, completion = end["prompt_tokens"], end["completion_tokens"]
        return cls(prompt, completion, prompt + completion, PromptTokensDetails(end.get("cached_tokens", 0)))


class GenerateResponse(Struct):
    model: str
    text: str
    finish_reason: str
    usage: Usage


class StreamOptions(Struct):
    include_usage: bool = False  # OpenAI: a last chunk with no choices and the request's usage


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
    stream_options: StreamOptions | None = None
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
    param: str | None = None


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
    gemv: str | None = None  # "sgemv": one-row products (decoding) go to the BLAS's sgemv (accel/gemv.c)


class Deleted(Struct):
    status: str
    model_id: str


# -- OpenAI's fine-tuning API (web/fine_tuning.py) -----------------------------------------


class FileObject(Struct):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: str = "file"
    status: str = "processed"  # validated line by line before it was kept
    expires_at: int | None = None
    status_details: str | None = None


class FileList(Struct):
    data: list[FileObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None
    object: str = "list"


class FileDeleted(Struct):
    id: str
    deleted: bool = True
    object: str = "file"


class FineTuningError(Struct):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(Struct):
    id: str
    created_at: int
    model: str
    status: str
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    seed: int
    training_file: str | None
    validation_file: str | None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    error: FineTuningError | None = None
    metadata: dict[str, str] | None = None
    user_provided_suffix: str | None = None
    result_files: list[str] = []
    integrations: list[dict[str, Any]] = []
    organization_id: str = "org-local"
    object: str = "fine_tuning.job"


class FineTuningJobList(Struct):
    data: list[FineTuningJob]
    has_more: bool
    object: str = "list"


class FineTuningEvent(Struct):
    id: str
    created_at: int
    level: str
    message: str
    type: str = "message"
    data: dict[str, Any] | None = None
    object: str = "fine_tuning.job.event"


class FineTuningEventList(Struct):
    data: list[FineTuningEvent]
    has_more: bool
    object: str = "list"


class FineTuningCheckpoint(Struct):
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, float]
    object: str = "fine_tuning.job.checkpoint"


class FineTuningCheckpointList(Struct):
    data: list[FineTuningCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
    object: str = "list"
