"""What a job carries from submission to its worker: the request, resolved against the registry."""

from __future__ import annotations

import msgspec

from .registry import BaseModel
from .schemas import FinetuneRequest, FuseRequest


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


JobSpec = FinetuneSpec | FuseSpec

encode = msgspec.json.Encoder().encode
decode = msgspec.json.Decoder(JobSpec).decode
