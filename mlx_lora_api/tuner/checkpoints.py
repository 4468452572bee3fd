"""Checkpoints that resume exactly: the adapter weights (mlx-lm's format) and the optimizer's
state, with the step they belong to; random state set afresh at each one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import msgspec
from mlx.utils import tree_flatten, tree_unflatten

from ..types import checkpoint_file


class Saved(msgspec.Struct):
    """A checkpoint on disk, as `latest` finds it."""

    iteration: int
    trained_tokens: int
    metrics: dict[str, Any]
    adapters: Path
    state: Path


def reseed(seed: int, iteration: int) -> None:
    """Random state is set afresh at each checkpoint, so a resumed run draws what an
    uninterrupted one would have (dropout masks) without saving MLX's generator state."""
    mx.random.seed((seed * 1_000_003 + iteration) % 2**32)


def save_atomically(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    partial = path.with_name(f".partial-{path.name}")
    mx.save_safetensors(str(partial), arrays, metadata)
    os.replace(partial, path)


def save(
    out_dir: Path,
    iteration: int,
    model: nn.Module,
    optimizer: optim.Optimizer,
    trained_tokens: int,
    metrics: dict[str, Any],
) -> Path:
    """Adapter weights and the optimizer's state. The state file is written last: a checkpoint
    counts once both are there."""
    folder = out_dir / "checkpoints"
    folder.mkdir(exist_ok=True)
    adapters = folder / checkpoint_file(iteration)
    save_atomically(adapters, dict(tree_flatten(model.trainable_parameters())))
    metadata = {"iteration": str(iteration), "trained_tokens": str(trained_tokens), "metrics": json.dumps(metrics)}
    save_atomically(folder / f"{iteration:07d}_state.safetensors", dict(tree_flatten(optimizer.state)), metadata)
    return adapters


def latest(out_dir: Path) -> Saved | None:
    for state in sorted((out_dir / "checkpoints").glob("[0-9]*_state.safetensors"), reverse=True):
        adapters = state.with_name(state.name.replace("_state", "_adapters"))
        if not adapters.exists():
            continue
        try:
            _, metadata = mx.load(str(state), return_metadata=True)
        except (RuntimeError, ValueError, OSError):
            continue  # a damaged file: fall back to the one before
        return Saved(
            int(metadata["iteration"]),
            int(metadata["trained_tokens"]),
            json.loads(metadata.get("metrics", "{}")),
            adapters,
            state,
        )
    return None


def restore(saved: Saved, model: nn.Module, optimizer: optim.Optimizer) -> None:
    model.load_weights(str(saved.adapters), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(saved.state)).items()))
    optimizer.init(model.trainable_parameters())
