"""Ids to folders, metadata and lineage, atomic writes, listing.

Layout under the data folder:
    models/<model_id>/     a base (imported) or fused model: config.json, *.safetensors, tokenizer, meta.json
    adapters/<model_id>/   mlx-lm's adapter format (adapter_config.json, adapters.safetensors) + meta.json
A folder appears only once complete: it is written under `.staging/` in the same parent and
renamed into place. Everything here is plain file work; nothing imports MLX.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import msgspec

from . import errors
from .schemas import ID_PATTERN, ModelRecord

META_FILE = "meta.json"
STAGING = ".staging"
DEFAULT_ALIAS = "default"
_ID_RE = re.compile(ID_PATTERN)
_HUB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
Kind = Literal["base", "adapter", "fused"]


class Meta(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What the service knows of a folder beyond mlx-lm's own files."""

    kind: Kind
    created_at: float
    base_model: str | None = None
    base_source: str | None = None
    adapter: str | None = None
    job_id: str | None = None
    source: str | None = None
    parameters: dict[str, Any] | None = None
    training_data: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    hub_id: str | None = None  # where the Hub knows this model (or the base it came from)
    license: str | None = None


class BaseModel(msgspec.Struct, frozen=True):
    """A resolved `base_model`: `ref` is its identity (a registry id, a folder or a repo id)."""

    ref: str
    source: Literal["registry", "path", "hub"]
    path: str | None = None  # None for a Hub repo not in the local cache yet


def check_id(value: str, field: str = "model_id") -> str:
    """Refuse anything that could leave its folder: separators, `..`, NUL, odd unicode."""
    if not isinstance(value, str) or len(value) > 96 or not _ID_RE.match(value) or ".." in value:
        raise errors.Invalid(
            f"`{field}` {value!r} is not a valid id: use 1-96 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def slug(text: str, limit: int = 40) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return (text[:limit].strip("-")) or "model"


def new_model_id(base_ref: str, label: str) -> str:
    name = base_ref.rstrip("/").rsplit("/", 1)[-1]
    return f"{slug(name)}-{label}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as e:
        raise errors.ServiceError(f"{path} is not readable JSON: {e}") from e


class DamagedArtifact(ValueError):
    """A model or adapter file that cannot be what it says; the message names the file."""


def check_safetensors(path: Path) -> None:
    """The header and the data it describes must fit in the file (cheap: reads the header only)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DamagedArtifact(f"{path} is damaged: {size} bytes, too short for a safetensors file")
            length = int.from_bytes(head, "little")
            if length > size - 8:
                raise DamagedArtifact(f"{path} is damaged: its header needs {length} bytes, the file has {size}")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise DamagedArtifact(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, DamagedArtifact):
            raise
        raise DamagedArtifact(f"{path} is damaged: its header is not JSON") from e
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise DamagedArtifact(f"{path} is damaged (truncated?): its tensors need {8 + length + end} bytes, the file has {size}")


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        raise DamagedArtifact(f"{path} is missing") from None
    except ValueError as e:
        raise DamagedArtifact(f"{path} is not readable JSON: {e}") from e


def check_model_folder(folder: Path) -> None:
    """What mlx-lm's `load` needs, checked first so that the error names the file."""
    _check_json(folder / "config.json")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise DamagedArtifact(f"{folder} holds no weights (*.safetensors)")
    for path in weights:
        check_safetensors(path)
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tiktoken.model")):
        raise DamagedArtifact(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)")


def check_adapter_folder(folder: Path) -> None:
    _check_json(folder / "adapter_config.json")
    check_safetensors(folder / "adapters.safetensors")


def write_meta(folder: Path, meta: Meta) -> None:
    (folder / META_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(meta)))


def read_meta(folder: Path) -> Meta | None:
    try:
        return msgspec.json.decode((folder / META_FILE).read_bytes(), type=Meta)
    except FileNotFoundError:
        return None
    except (msgspec.DecodeError, OSError) as e:
        raise errors.ServiceError(f"{folder / META_FILE} is damaged: {e}") from e


def staging_dir(final: Path, name: str) -> Path:
    return final.parent / STAGING / name


def has_checkpoints(work: Path) -> bool:
    return any((work / "checkpoints").glob("*.safetensors"))


@contextlib.contextmanager
def staged(final: Path, keep_if: Callable[[Path], bool] = lambda work: False, name: str | None = None) -> Iterator[Path]:
    """Yield a work folder beside `final`; rename it into place on success.

    On error the folder is removed, unless `keep_if(folder)` says it holds work worth keeping
    (a fine-tune's checkpoints); the error then names where it is. A `name` makes the folder
    findable again, so that a resumed job picks up what the interrupted one left.
    """
    work = staging_dir(final, name or f"{final.name}-{secrets.token_hex(4)}")
    work.mkdir(parents=True, exist_ok=name is not None)
    try:
        yield work
        if final.exists():
            raise FileExistsError(f"{final} already exists")
        os.rename(work, final)
    except BaseException as e:
        if work.exists() and keep_if(work):
            e.add_note(f"its checkpoints are kept in {work}")
            raise
        shutil.rmtree(work, ignore_errors=True)
        raise


class Registry:
    def __init__(self, data_dir: Path, default_model: str, model_roots: list[Path] | None = None):
        self.data_dir = Path(data_dir)
        self.models_dir = self.data_dir / "models"
        self.adapters_dir = self.data_dir / "adapters"
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
        return bool(_ID_RE.match(model_id)) and (self.models_dir / model_id / "config.json").is_file()

    def is_adapter(self, model_id: str) -> bool:
        return bool(_ID_RE.match(model_id)) and (self.adapters_dir / model_id / "adapter_config.json").is_file()

    def taken(self, model_id: str) -> bool:
        return (self.models_dir / model_id).exists() or (self.adapters_dir / model_id).exists()

    # -- base models -------------------------------------------------------------------

    def resolve_base(self, ref: str, hub_lookup=None, field: str = "base_model") -> BaseModel:
        """`default`, a registry id, a local folder under the allowed roots, or a Hub repo id."""
        if "\x00" in ref:
            raise errors.Invalid(f"`{field}` contains a NUL byte")
        if ref == DEFAULT_ALIAS:
            if not self.is_model(self.default_model):
                raise errors.NotFound(
                    f"the default model {self.default_model!r} is not imported yet: run "
                    "`mlx-lora-api import-gguf --bundled` (./scripts/serve does it on first start)"
                )
            ref = self.default_model
        if self.is_model(ref):
            return BaseModel(ref=ref, source="registry", path=str(self.models_dir / ref))
        if ref.startswith(("/", "./", "../", "~")) or os.sep in ref and Path(ref).expanduser().exists():
            return self._resolve_folder(ref, field)
        if _HUB_RE.match(ref):
            if hub_lookup is None:
                raise errors.NotFound(self._not_found(ref))
            try:
                path = hub_lookup(ref)
            except (errors.NotFound, errors.Unavailable) as e:
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
                return self._record(folder)
        raise errors.NotFound(f"no model or adapter with id {model_id!r}")

    def _record(self, folder: Path, with_files: bool = True) -> ModelRecord:
        meta = read_meta(folder)
        kind = meta.kind if meta else ("adapter" if folder.parent == self.adapters_dir else "base")
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        return ModelRecord(
            model_id=folder.name,
            kind=kind,
            created_at=meta.created_at if meta else folder.stat().st_mtime,
            size_bytes=folder_size(folder),
            status="ready",
            base_model=meta.base_model if meta else None,
            adapter=meta.adapter if meta else None,
            job_id=meta.job_id if meta else None,
            source=meta.source if meta else None,
            parameters=meta.parameters if meta else None,
            training_data=meta.training_data if meta else None,
            metrics=meta.metrics if meta else None,
            parity=meta.parity if meta else None,
            quantization=meta.quantization if meta else None,
            files=files if with_files else None,
        )

    def list_models(self, kind: str | None = None, base: str | None = None) -> list[ModelRecord]:
        records = []
        for parent in (self.models_dir, self.adapters_dir):
            if not parent.is_dir():
                continue
            for folder in sorted(parent.iterdir()):
                if folder.name.startswith(".") or not folder.is_dir() or not _ID_RE.match(folder.name):
                    continue
                try:
                    record = self._record(folder, with_files=False)
                except errors.ServiceError:
                    continue  # a damaged meta.json hides one entry, not the whole listing
                if kind and record.kind != kind:
                    continue
                if base and record.base_model != base:
                    continue
                records.append(record)
        return sorted(records, key=lambda r: r.created_at, reverse=True)
