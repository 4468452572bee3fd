"""The registry's file work: `meta.json`, JSON reads that name the file, and folders that
appear only once complete (`staged`)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from .. import errors
from ..types import ModelMeta, checkpoint_file

META_FILE = "meta.json"
STAGING = ".staging"


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as e:
        raise errors.ServiceError(f"{path} is not readable JSON: {e}") from e


def write_meta(folder: Path, meta: ModelMeta) -> None:
    (folder / META_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(meta)))


def read_meta(folder: Path) -> ModelMeta | None:
    try:
        return msgspec.json.decode((folder / META_FILE).read_bytes(), type=ModelMeta)
    except FileNotFoundError:
        return None
    except (msgspec.DecodeError, OSError) as e:
        raise errors.ServiceError(f"{folder / META_FILE} is damaged: {e}") from e


def staging_dir(final: Path, name: str) -> Path:
    return final.parent / STAGING / name


def has_checkpoints(work: Path) -> bool:
    return any((work / "checkpoints").glob("*.safetensors"))


def checkpoint_steps(folder: Path) -> list[int]:
    """The iterations an adapter folder (or a fine-tune's work folder) has checkpoints of."""
    return sorted(int(p.name.split("_")[0]) for p in folder.glob("checkpoints/[0-9]*_adapters.safetensors"))


def checkpoint_view(folder: Path, step: int, view: Path) -> Path:
    """The adapter's checkpoint at `step` shown as an adapter folder, `view`: the adapter's config
    and a link to the checkpoint's weights (no copy), each renamed into place. What reads adapter
    folders (generation, the fuse) then reads a checkpoint unchanged."""
    view.mkdir(parents=True, exist_ok=True)
    weights = folder / "checkpoints" / checkpoint_file(step)
    for name, make in (
        ("adapter_config.json", lambda tmp: shutil.copyfile(folder / "adapter_config.json", tmp)),
        ("adapters.safetensors", lambda tmp: os.symlink(weights, tmp)),
    ):
        tmp = view / f".{name}.{secrets.token_hex(4)}"
        make(tmp)
        os.replace(tmp, view / name)
    return view


@contextlib.contextmanager
def staged(
    final: Path, keep_if: Callable[[Path], bool] = lambda work: False, name: str | None = None
) -> Iterator[Path]:
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
