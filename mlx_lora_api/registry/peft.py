"""Importing a Hugging Face PEFT adapter into the registry: the conversion (tasks/import_peft.py, no
MLX) into a staged adapter folder, with its `meta.json`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..tasks import import_peft
from ..types import BaseModel, ModelMeta
from .files import staged, write_meta
from .registry import Registry


def register(peft_dir: Path, reg: Registry, name: str, base: BaseModel, source: str, hub_id: str | None) -> dict:
    """Import into the registry as adapter `name` of `base`, atomically; returns what was imported."""
    final = reg.adapter_dir(name)
    if final.exists():
        raise FileExistsError(f"adapter {name!r} already exists in {reg.adapters_dir}")
    assert base.path is not None  # the service resolves a local base first
    reg.ensure_folders()
    with staged(final) as work:
        found: dict[str, Any] = import_peft.convert(peft_dir, Path(base.path), work, base.ref)
        parameters = {"fine_tune_type": "lora", "rank": found["rank"], "scale": found["scale"]}
        meta = ModelMeta(
            kind="adapter",
            created_at=time.time(),
            base_model=base.ref,
            base_source=base.source,
            source=source,
            hub_id=hub_id,
            parameters={**parameters, "num_layers": found["num_layers"]},
        )
        write_meta(work, meta)
    return found
