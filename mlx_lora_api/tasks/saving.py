"""Save a model folder as `mlx_lm.utils.save` does, computing and writing one tensor at a time.

A model loaded lazily and changed lazily (fused, quantized) is a graph over the file it came from:
each weight is read and computed only when evaluated. `mlx_lm.utils.save` hands the whole
dictionary to `mx.save_safetensors`, which evaluates all of it first, so the job holds every weight
at once, and fusing a 7B model in float16 takes 14 GB. Here each tensor is evaluated, written and let
go, and the peak is one tensor's work over what the process holds anyway (scripts/bench_fuse.py).

The files are mlx-lm's: `model.safetensors` (or numbered shards of at most 5 GB) with metadata
`{"format": "mlx"}`, `model.safetensors.index.json`, `config.json`, the tokenizer, the base's `*.py`
and `generation_config.json`, and a model card. The weights are written under a `.partial` name and
put in place only once every tensor is written and `before_commit` (a check on what was computed on
the way) has passed; otherwise they are removed.
"""

from __future__ import annotations

import glob
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import create_model_card, get_total_parameters, make_shards, save_config

# safetensors' names for MLX's dtypes (https://github.com/huggingface/safetensors, format.md).
DTYPES = {
    mx.bool_: "BOOL",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.uint16: "U16",
    mx.int16: "I16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.uint64: "U64",
    mx.int64: "I64",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.float32: "F32",
    mx.float64: "F64",
}


def _header(shard: Mapping[str, mx.array]) -> bytes:
    """The shard's JSON header with its 8-byte length in front, padded with spaces to a multiple of 8
    bytes as the safetensors library writes it (the data that follows is then aligned)."""
    entries: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, value in shard.items():
        if value.dtype not in DTYPES:
            raise ValueError(f"weight {name!r} is {value.dtype}, which safetensors cannot hold")
        entries[name] = {
            "dtype": DTYPES[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + value.nbytes],
        }
        offset += value.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_shard(path: Path, shard: dict[str, mx.array], with_each: Mapping[str, Sequence[mx.array]]) -> None:
    """Write `shard`, emptying it: each tensor leaves the dictionary as it is written, so that
    nothing here holds it afterwards."""
    with open(path, "wb") as f:
        f.write(_header(shard))
        for name in list(shard):
            value = shard.pop(name)
            mx.eval(value, *with_each.get(name, ()))
            if value.size and not memoryview(value).c_contiguous:
                value = mx.contiguous(value)
                mx.eval(value)
            f.write(memoryview(value))
            del value


def save(
    out_dir: Path,
    base_path: Path,
    weights: dict[str, mx.array],
    tokenizer: Any,
    config: dict[str, Any],
    *,
    total_parameters: int,
    keep_vision_config: bool = False,
    with_each: Mapping[str, Sequence[mx.array]] | None = None,
    before_commit: Callable[[], None] = lambda: None,
) -> None:
    """Save `weights` (emptied as they are written: hold no other reference to them, and they are
    freed one by one) with the rest of a model folder. `with_each[name]` are arrays evaluated in
    the same step as weight `name` (a check computed from the same inputs, which are then read
    once)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    total_size = sum(value.nbytes for value in weights.values())
    shards = make_shards(weights)
    weights.clear()
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map = {key: name for shard, name in zip(shards, names) for key in shard}
    partial = [out_dir / f"{name}.partial" for name in names]
    try:
        for i, path in enumerate(partial):
            shard, shards[i] = shards[i], {}
            _write_shard(path, shard, with_each or {})
        before_commit()
    except BaseException:
        for path in partial:
            path.unlink(missing_ok=True)
        raise
    for path, name in zip(partial, names):
        path.replace(out_dir / name)
    index = {
        "metadata": {"total_size": total_size, "total_parameters": total_parameters},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    # The rest as `mlx_lm.utils.save` writes it after the weights.
    save_config(config, config_path=out_dir / "config.json", keep_vision_config=keep_vision_config)
    tokenizer.save_pretrained(out_dir)
    for pattern in ["*.py", "generation_config.json"]:
        for file in glob.glob(str(base_path / pattern)):
            shutil.copy(file, out_dir)
    create_model_card(out_dir, None)


def save_model(
    out_dir: Path,
    base_path: Path,
    model: nn.Module,
    tokenizer: Any,
    config: dict[str, Any],
    *,
    with_each: Mapping[str, Sequence[mx.array]] | None = None,
    before_commit: Callable[[], None] = lambda: None,
) -> None:
    """`save` for a model, which gives its weights up (as `mlx_lm.utils.save`'s `donate_model`
    does: each parameter replaced by an empty array), so that a caller still holding the model
    does not hold the weights while they are written."""
    weights = dict(tree_flatten(model.parameters()))
    total, vision = get_total_parameters(model), "vision_tower" in getattr(model, "model", {})
    model.update(tree_map(lambda _: mx.array([]), model.parameters()))
    save(
        out_dir,
        base_path,
        weights,
        tokenizer,
        config,
        total_parameters=total,
        keep_vision_config=vision,
        with_each=with_each,
        before_commit=before_commit,
    )
