"""What a model or adapter folder must hold before MLX loads it, checked first (cheaply: headers
only) so that the error names the damaged file rather than failing deep inside mlx-lm."""

from __future__ import annotations

import json
from pathlib import Path

# What the GGUF export writes (export_gguf.py); the service checks it before it queues an export,
# here because importing the gguf package would cost every server start a tenth of a second.
GGUF_ARCHITECTURES = ("llama", "mistral")


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
        raise DamagedArtifact(
            f"{path} is damaged (truncated?): its tensors need {8 + length + end} bytes, the file has {size}"
        )


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
