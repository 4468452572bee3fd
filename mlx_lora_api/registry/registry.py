"""The registry: ids to folders, base-model references resolved, records listed and deleted.

Layout under the data folder:
    models/<model_id>/     a base (imported) or fused model: config.json, *.safetensors, tokenizer, meta.json
    adapters/<model_id>/   mlx-lm's adapter format (adapter_config.json, adapters.safetensors) + meta.json
A folder appears only once complete: it is written under `.staging/` in the same parent and
renamed into place (files.staged). Everything here is plain file work; nothing imports MLX.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from .. import errors
from ..types import BaseModel, ModelRecord
from .files import STAGING, folder_size, read_json, read_meta
from .ids import HUB_RE, ID_RE, check_id

DEFAULT_ALIAS = "default"
HubLookup = Callable[[str], "str | None"]


class Registry:
    def __init__(self, data_dir: Path, default_model: str, model_roots: list[Path] | None = None):
        self.data_dir = Path(data_dir)
        self.models_dir = self.data_dir / "models"
        self.adapters_dir = self.data_dir / "adapters"
        # each base's answers to the retention prompts (tuner/retention.py), computed once
        self.retention_cache = self.data_dir / "cache" / "retention"
        self.default_model = default_model
        self.model_roots = [self.data_dir, *(model_roots or [])]

    def ensure_folders(self) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.adapters_dir.mkdir(parents=True, exist_ok=True)

    def model_dir(self, model_id: str) -> Path:
        return self.models_dir / check_id(model_id)

    def adapter_dir(self, model_id: str) -> Path:
        return self.adapters_dir / check_id(model_id)

    def is_model(self, model_id: str) -> bool:
        return bool(ID_RE.match(model_id)) and (self.models_dir / model_id / "config.json").is_file()

    def is_adapter(self, model_id: str) -> bool:
        return bool(ID_RE.match(model_id)) and (self.adapters_dir / model_id / "adapter_config.json").is_file()

    def taken(self, model_id: str) -> bool:
        return (self.models_dir / model_id).exists() or (self.adapters_dir / model_id).exists()

    # -- base models -------------------------------------------------------------------

    def resolve_base(self, ref: str, hub_lookup: HubLookup | None = None, field: str = "base_model") -> BaseModel:
        """`default`, a registry id, a local folder under the allowed roots, or a Hub repo id."""
        if "\x00" in ref:
            raise errors.Invalid(f"`{field}` contains a NUL byte")
        if ref == DEFAULT_ALIAS:
            if not self.is_model(self.default_model):
                raise errors.NotFound(
                    f"the default model {self.default_model!r} is not imported yet: run "
                    "`mlx-lora-api import-gguf --bundled` (`mlx-lora-api serve` does it on first start)"
                )
            ref = self.default_model
        if self.is_model(ref):
            return BaseModel(ref=ref, source="registry", path=str(self.models_dir / ref))
        if ref.startswith(("/", "./", "../", "~")) or (os.sep in ref and Path(ref).expanduser().exists()):
            return self._resolve_folder(ref, field)
        if HUB_RE.match(ref):
            if hub_lookup is None:
                raise errors.NotFound(self._not_found(ref, field))
            try:
                path = hub_lookup(ref)
            except (errors.Conflict, errors.Invalid, errors.NotFound, errors.Unavailable) as e:
                raise type(e)(f"`{field}` {e.message}; local models: {self._local_listing()}") from e
            return BaseModel(ref=ref, source="hub", path=path)
        raise errors.NotFound(self._not_found(ref, field))

    def _resolve_folder(self, ref: str, field: str) -> BaseModel:
        try:
            path = Path(ref).expanduser().resolve()
        except RuntimeError as e:  # "~someone" with no such user
            raise errors.NotFound(f"`{field}` folder {ref!r} cannot be found: {e}") from e
        if not any(path.is_relative_to(root) for root in self.model_roots):
            roots = ", ".join(str(r) for r in self.model_roots)
            raise errors.Forbidden(f"`{field}` folder {ref!r} is outside the allowed model roots ({roots})")
        if not (path / "config.json").is_file():
            raise errors.NotFound(f"`{field}` folder {ref!r} holds no config.json, so it is not a model folder")
        return BaseModel(ref=str(path), source="path", path=str(path))

    def _local_listing(self) -> str:
        local = [r.model_id for r in self.list_models() if r.kind != "adapter"]
        return ", ".join(local) if local else "none yet"

    def _not_found(self, ref: str, field: str) -> str:
        return (
            f"`{field}` {ref!r} is not a local model, a model folder or a Hugging Face repo id; "
            f"local models: {self._local_listing()}"
        )

    def num_layers(self, base: BaseModel) -> int | None:
        if base.path is None:
            return None
        config = read_json(Path(base.path) / "config.json")
        text_config = config.get("text_config", config)
        return text_config.get("num_hidden_layers") or text_config.get("n_layers")

    # -- deleting -----------------------------------------------------------------------

    def dependents(self, model_id: str) -> list[str]:
        """Models that name `model_id` as their base or their adapter."""
        return [r.model_id for r in self.list_models() if model_id in (r.base_model, r.adapter)]

    def delete(self, model_id: str) -> None:
        """Move the folder out of sight first, so that a half-deleted model is never listed."""
        for parent in (self.models_dir, self.adapters_dir):
            folder = parent / check_id(model_id)
            if folder.is_dir():
                trash = parent / STAGING / f"{model_id}-deleted-{secrets.token_hex(4)}"
                trash.parent.mkdir(exist_ok=True)
                os.rename(folder, trash)
                shutil.rmtree(trash, ignore_errors=True)
                return
        raise errors.NotFound(f"no model or adapter with id {model_id!r}")

    # -- listing ------------------------------------------------------------------------

    def record(self, model_id: str) -> ModelRecord:
        for parent in (self.models_dir, self.adapters_dir):
            folder = parent / check_id(model_id)
            if folder.is_dir():
                try:
                    return self._record(folder)
                except FileNotFoundError:
                    break  # deleted (or renamed) while it was read
        raise errors.NotFound(f"no model or adapter with id {model_id!r}")

    def _record(self, folder: Path, with_files: bool = True) -> ModelRecord:
        """The folder's record; a damaged meta.json gives status `damaged` and says why, rather
        than hiding the folder (it still takes disk space, and the user must see it to fix it)."""
        try:
            meta, problem = read_meta(folder), None
        except errors.ServiceError as e:
            meta, problem = None, e.message
        kind = meta.kind if meta else ("adapter" if folder.parent == self.adapters_dir else "base")
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        return ModelRecord(
            model_id=folder.name,
            kind=kind,
            created_at=meta.created_at if meta else folder.stat().st_mtime,
            size_bytes=folder_size(folder),
            status="damaged" if problem else "ready",
            problem=problem,
            base_model=meta.base_model if meta else None,
            adapter=meta.adapter if meta else None,
            job_id=meta.job_id if meta else None,
            source=meta.source if meta else None,
            parameters=meta.parameters if meta else None,
            training_data=meta.training_data if meta else None,
            metrics=meta.metrics if meta else None,
            parity=meta.parity if meta else None,
            retention=meta.retention if meta else None,
            quantization=meta.quantization if meta else None,
            resumed_from=meta.resumed_from if meta else None,
            adapter_checkpoint=meta.adapter_checkpoint if meta else None,
            files=files if with_files else None,
        )

    def list_models(self, kind: str | None = None, base: str | None = None) -> list[ModelRecord]:
        records = []
        for parent in (self.models_dir, self.adapters_dir):
            if not parent.is_dir():
                continue
            for folder in sorted(parent.iterdir()):
                if folder.name.startswith(".") or not folder.is_dir() or not ID_RE.match(folder.name):
                    continue
                try:
                    record = self._record(folder, with_files=False)
                except FileNotFoundError:
                    continue  # deleted (or renamed) while the listing ran: gone, not an error
                if kind and record.kind != kind:
                    continue
                if base and record.base_model != base:
                    continue
                records.append(record)
        return sorted(records, key=lambda r: r.created_at, reverse=True)
