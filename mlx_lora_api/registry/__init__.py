"""The registry and the Hub: model ids to folders, `meta.json`, lineage, atomic publication,
and where base models come from and results go. Plain file work: no MLX."""

from .files import (
    checkpoint_steps,
    checkpoint_view,
    has_checkpoints,
    read_json,
    read_meta,
    staged,
    staging_dir,
    write_meta,
)
from .ids import HUB_RE, check_id, new_model_id
from .registry import DEFAULT_ALIAS, Registry

__all__ = [
    "DEFAULT_ALIAS",
    "HUB_RE",
    "Registry",
    "check_id",
    "checkpoint_steps",
    "checkpoint_view",
    "has_checkpoints",
    "new_model_id",
    "read_json",
    "read_meta",
    "staged",
    "staging_dir",
    "write_meta",
]
