"""The Hugging Face Hub: finding and fetching base models. No MLX here."""

from __future__ import annotations

from pathlib import Path

from . import errors

# What a model folder needs; leaves out other frameworks' weights (*.bin, *.pt, *.gguf, ...).
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py"]


def cached_path(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, allow_patterns=MODEL_FILES, local_files_only=True)
    except Exception:  # not cached, or a partial cache: either way, not usable offline
        return None
    return path if (Path(path) / "config.json").is_file() else None


def lookup(repo_id: str, timeout: float = 10.0) -> str | None:
    """The cached folder of `repo_id`, or None where the Hub has it but it is not fetched yet.

    Raises NotFound where the Hub does not know the repo, Unavailable where it can't be asked.
    """
    if path := cached_path(repo_id):
        return path
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=timeout)
    except GatedRepoError as e:
        raise errors.Forbidden(f"Hugging Face repo {repo_id!r} is gated: accept its terms and log in") from e
    except RepositoryNotFoundError as e:
        raise errors.NotFound(f"Hugging Face repo {repo_id!r} does not exist (or is private)") from e
    except OfflineModeIsEnabled as e:
        raise errors.Unavailable(f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set") from e
    except Exception as e:
        raise errors.Unavailable(
            f"{repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached ({type(e).__name__})"
        ) from e
    return None


def download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=MODEL_FILES)
