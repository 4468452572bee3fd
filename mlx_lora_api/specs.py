"""What a job carries from submission to its worker: the request, resolved against the registry."""

from __future__ import annotations

import msgspec

from .registry import BaseModel
from .schemas import ExportRequest, FinetuneRequest, FuseRequest, PushRequest, QuantizeRequest


class FinetuneSpec(msgspec.Struct, tag="finetune", kw_only=True):
    job_id: str
    model_id: str
    base: BaseModel
    request: FinetuneRequest
    num_layers: int | None = None  # resolved from the base's config where it is local


class FuseSpec(msgspec.Struct, tag="fuse", kw_only=True):
    job_id: str
    model_id: str
    base: BaseModel
    adapter: str
    request: FuseRequest


class QuantizeSpec(msgspec.Struct, tag="quantize", kw_only=True):
    job_id: str
    model_id: str  # the new model
    base: BaseModel  # the model quantized
    request: QuantizeRequest


class ExportSpec(msgspec.Struct, tag="export", kw_only=True):
    job_id: str
    model_id: str  # the model exported; the files go into its gguf/ folder
    base: BaseModel
    request: ExportRequest


class PushSpec(msgspec.Struct, tag="push", kw_only=True):
    job_id: str
    model_id: str  # the model or adapter pushed
    base: BaseModel  # ref: the same id; path: its folder
    request: PushRequest
    card: str


JobSpec = FinetuneSpec | FuseSpec | QuantizeSpec | ExportSpec | PushSpec


def kind(spec: JobSpec) -> str:
    return type(spec).__struct_config__.tag

encode = msgspec.json.Encoder().encode
decode = msgspec.json.Decoder(JobSpec).decode
