"""The Hugging Face Hub: finding and fetching base models, publishing results with a model card.
No MLX here. `huggingface_hub` is imported where it is used: it takes about 0.3 s to import,
which every server start and CLI command would pay for a feature most of them never touch."""

from __future__ import annotations

import json
from pathlib import Path

from .. import errors

# What a model folder needs; leaves out other frameworks' weights (*.bin, *.pt, *.gguf, ...).
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py"]


def cached_path(repo_id: str) -> str | None:
    """The local cache's folder of `repo_id`, None where it is not cached; a cached copy that
    cannot be a model is reported (409), not taken for "not cached" and fetched over it."""
    from huggingface_hub import snapshot_download  # lazy: see the module's doc
    from huggingface_hub.errors import LocalEntryNotFoundError  # lazy: see the module's doc

    try:
        path = snapshot_download(repo_id, allow_patterns=MODEL_FILES, local_files_only=True)
    except LocalEntryNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise _damaged(repo_id, f"it cannot be read ({e})") from e
    config = Path(path) / "config.json"
    if not config.is_file():
        raise _damaged(repo_id, f"{config} is missing (an interrupted download?)")
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise _damaged(repo_id, f"{config} is not readable JSON ({e})") from e
    return path


def _damaged(repo_id: str, why: str) -> errors.Conflict:
    return errors.Conflict(
        f"the local Hugging Face cache's copy of {repo_id!r} is damaged: {why}; delete it "
        f"(`hf cache delete`, or remove its models--{repo_id.replace('/', '--')} folder) and try again"
    )


def lookup(repo_id: str, timeout: float = 10.0) -> str | None:
    """The cached folder of `repo_id`, or None where the Hub has it but it is not fetched yet.

    Raises Invalid where the Hub would refuse the id itself, NotFound where it does not know
    the repo, Unavailable where it can't be asked.
    """
    check_repo_id(repo_id, field=None)
    if path := cached_path(repo_id):
        return path
    from huggingface_hub import HfApi  # lazy: see the module's doc
    from huggingface_hub.errors import (  # lazy: see the module's doc
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )  # lazy: see the module's doc

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
    from huggingface_hub import snapshot_download  # lazy: see the module's doc

    return snapshot_download(repo_id, allow_patterns=MODEL_FILES)


# -- publishing ----------------------------------------------------------------------------

UPLOAD_IGNORE = ["meta.json", "checkpoints/*", "gguf/*", "peft/*", ".*"]


def token() -> str | None:
    """HF_TOKEN, or the token `hf auth login` stored; never logged, never returned."""
    from huggingface_hub import get_token  # lazy: see the module's doc

    return get_token()


def check_repo_id(repo_id: str, field: str | None = "repo_id") -> str:
    """The Hub's own rules for a repo id (huggingface_hub's validate_repo_id), as a 422 that names
    `field` (None: the caller names it)."""
    from huggingface_hub.errors import HFValidationError  # lazy: see the module's doc
    from huggingface_hub.utils import validate_repo_id  # lazy: see the module's doc

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        where = f"`{field}` " if field else ""
        raise errors.Invalid(f"{where}{repo_id!r} is not a valid Hugging Face repo id: {e}") from e
    return repo_id


def model_card(model_id: str, repo_id: str, lineage: list[dict], base_hub_id: str | None, license: str | None) -> str:
    """A model card: YAML header for the Hub, then what the model is and how it was made.

    `lineage` runs from the pushed model down to its base, each a registry record as a dict.
    """
    from huggingface_hub import ModelCard, ModelCardData  # lazy: see the module's doc

    pushed = lineage[0]
    tags = ["mlx", "mlx-lora-api", "text-generation"]
    tags.append("lora" if pushed["kind"] == "adapter" else "fine-tuned" if pushed["kind"] == "fused" else "base")
    card_data = ModelCardData(
        base_model=base_hub_id, library_name="mlx", license=license, pipeline_tag="text-generation", tags=tags
    )
    body = [f"# {repo_id.split('/')[-1]}", ""]
    kind = {"adapter": "A LoRA adapter", "fused": "A fine-tuned model", "base": "A model"}[pushed["kind"]]
    body.append(f"{kind} made with mlx-lora-api on [MLX](https://github.com/ml-explore/mlx) (local id `{model_id}`).")
    body += ["", "## Lineage", ""]
    for record in lineage:
        body.append(f"- `{record['model_id']}` ({record['kind']})")
    if base_hub_id:
        body.append(f"- base on the Hub: [{base_hub_id}](https://huggingface.co/{base_hub_id})")
    trained = next((r for r in lineage if r.get("parameters")), None)
    if trained:
        body += ["", "## Training", "", "| parameter | value |", "|---|---|"]
        body += [f"| {k} | {v} |" for k, v in trained["parameters"].items() if v is not None]
        data = trained.get("training_data") or {}
        if data:
            body += [
                "",
                f"Data: {data.get('samples')} samples ({data.get('format')}), "
                f"{data.get('validation_samples', 0)} for validation, sha256 `{data.get('sha256')}`.",
            ]
        metrics = trained.get("metrics") or {}
        shown = ["final_train_loss", "final_val_loss", "best_val_loss", "trained_tokens", "iterations"]
        if any(k in metrics for k in shown):
            body += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
            body += [
                f"| {k} | {metrics[k]:.4f} |" if isinstance(metrics[k], float) else f"| {k} | {metrics[k]} |"
                for k in shown
                if k in metrics
            ]
    kept = next((r["retention"] for r in lineage if r.get("retention")), None)
    if kept:
        body += [
            "",
            "## Retention",
            "",
            f"Against its base on 24 general prompts: retention {kept['score']:.2f} (how likely it still finds the"
            f" base's own answers, per token; 1.0 = unchanged), {kept['kept']} of {kept['probes']} answers unchanged.",
        ]
    body += ["", "## Use", "", "```bash"]
    if pushed["kind"] == "adapter":
        body.append(
            f"mlx_lm.generate --model {base_hub_id or '<base model>'} --adapter-path <download of {repo_id}>"
            ' --prompt "Hello"'
        )
    else:
        body.append(f'mlx_lm.generate --model {repo_id} --prompt "Hello"')
    body.append("```")
    return str(ModelCard("\n".join(["---", card_data.to_yaml(), "---", *body]) + "\n"))


def push(folder: Path, repo_id: str, private: bool, commit_message: str, card: str, api=None) -> str:
    """create_repo, then upload_folder; returns the commit's URL."""
    from huggingface_hub import HfApi, ModelCard  # lazy: see the module's doc

    api = api or HfApi(token=token())
    api.create_repo(repo_id, private=private, exist_ok=True)
    ModelCard(card).save(folder / "README.md")
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, ignore_patterns=UPLOAD_IGNORE
    )
    return getattr(info, "commit_url", None) or str(info)


ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md"]


def adapter_path(repo_id: str) -> str:
    """The local folder of a PEFT adapter repo: the cache's copy, else fetched (Unavailable where
    the Hub cannot be reached, NotFound where it does not know the repo)."""
    from huggingface_hub import snapshot_download  # lazy: see the module's doc
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError  # lazy: as above

    check_repo_id(repo_id, field="source")
    try:
        return snapshot_download(repo_id, allow_patterns=ADAPTER_FILES, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=ADAPTER_FILES)
    except RepositoryNotFoundError as e:
        raise errors.NotFound(f"`source`: Hugging Face repo {repo_id!r} does not exist (or is private)") from e
    except Exception as e:
        raise errors.Unavailable(
            f"`source`: {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached"
            f" ({type(e).__name__})"
        ) from e
