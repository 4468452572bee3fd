"""Importing a GGUF file into the registry: the import (tasks/import_gguf.py, no MLX) into a
staged folder, with its `meta.json`."""

from __future__ import annotations

import time
from pathlib import Path

from ..tasks import import_gguf
from ..types import ModelMeta
from .files import staged, write_meta
from .registry import Registry


def register(gguf_path: Path, reg: Registry, name: str, hub_id: str | None = None) -> Path:
    """Import into the registry as model `name`, atomically, with its meta.json."""
    final = reg.model_dir(name)
    if final.exists():
        raise FileExistsError(f"model {name!r} already exists in {reg.models_dir}")
    reg.ensure_folders()
    with staged(final) as work:
        found = import_gguf.import_gguf(gguf_path, work)
        meta = ModelMeta(
            kind="base", created_at=time.time(), source=Path(gguf_path).name, license=found["license"], hub_id=hub_id
        )
        write_meta(work, meta)
    return final
