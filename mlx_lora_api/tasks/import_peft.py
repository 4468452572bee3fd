"""A Hugging Face PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`) as an
mlx-lm adapter folder, for a base model of the registry. No MLX: numpy and the safetensors header.

PEFT's `lora_A.weight` (r, in) and `lora_B.weight` (out, r) are mlx-lm's `lora_a` (in, r) and
`lora_b` (r, out) transposed; mlx-lm's `scale` is PEFT's `lora_alpha / r` (`/ sqrt(r)` with
rsLoRA). mlx-lm puts LoRA layers on the last `num_layers` blocks, on every linear layer of each
by default. So the adapter is written in that default layout, from the first block PEFT adapted to
the last: what PEFT left out (other modules, or blocks it skipped) gets a LoRA layer whose `lora_b`
is zero, which changes nothing, and whose `lora_a` is initialised as mlx-lm's, so that training
further (`resume_from`) moves it like any other. The imported adapter then computes what PEFT's
does, and is trained, fused and exported as the service's own are.

Not imported, each with a message naming it: DoRA, biases, `modules_to_save`, per-module ranks or
alphas, LoRA on the embeddings or the output layer.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.([a-z_0-9.]+?)\.lora_([AB])(?:\.[a-z_0-9]+)?\.weight$")
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class PeftImportError(ValueError):
    """What about an adapter cannot be imported, and what to do."""


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 (bfloat16 included, which numpy lacks)."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise PeftImportError(
                f"{path.name}: tensor {name!r} is {info['dtype']}; expected float32, float16 or bfloat16"
            )
        start, end = info["data_offsets"]
        raw = np.frombuffer(data[8 + size + start : 8 + size + end], dtype=_DTYPES[info["dtype"]])
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = raw.astype(np.float32).reshape(info["shape"])
    return tensors


def base_shapes(base_dir: Path) -> dict[str, list[int]]:
    """The shapes of the base's tensors, from its safetensors headers (nothing else is read)."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _check_config(config: dict[str, Any]) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise PeftImportError(f"`peft_type` is {config.get('peft_type')!r}: only LoRA adapters are imported")
    refused = [
        (config.get("use_dora"), "`use_dora`: DoRA adapters are not imported"),
        (config.get("bias", "none") != "none", f"`bias` is {config.get('bias')!r}: only bias none is imported"),
        (config.get("modules_to_save"), "`modules_to_save`: fully trained modules are not imported"),
        (config.get("rank_pattern"), "`rank_pattern`: mlx-lm has one rank for every layer"),
        (config.get("alpha_pattern"), "`alpha_pattern`: mlx-lm has one scale for every layer"),
    ]
    for bad, why in refused:
        if bad:
            raise PeftImportError(f"{CONFIG}: {why}")


def convert(peft_dir: Path, base_dir: Path, out_dir: Path, base_ref: str, seed: int = 0) -> dict[str, Any]:
    """Write mlx-lm's `adapter_config.json` and `adapters.safetensors` into `out_dir`; returns what was imported."""
    for name in (CONFIG, WEIGHTS):
        if not (peft_dir / name).is_file():
            raise PeftImportError(f"{peft_dir} has no {name}: a PEFT adapter folder has {CONFIG} and {WEIGHTS}")
    try:
        config = json.loads((peft_dir / CONFIG).read_text())
    except ValueError as e:
        raise PeftImportError(f"{CONFIG} is not valid JSON ({e})") from e
    _check_config(config)
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in read_safetensors(peft_dir / WEIGHTS).items():
        match = _KEY.match(key)
        if match is None:
            raise PeftImportError(
                f"{WEIGHTS}: {key!r} is not a LoRA weight of a transformer block's linear layer"
                " (LoRA on the embeddings or the output layer is not imported)"
            )
        layer, module, which = int(match[1]), match[2], match[3]
        pairs.setdefault((layer, module), {})[which] = value
    if not pairs:
        raise PeftImportError(f"{WEIGHTS} holds no LoRA weights")

    base_config = json.loads((base_dir / "config.json").read_text())
    layers = int(base_config["num_hidden_layers"])
    shapes = base_shapes(base_dir)
    bits = (base_config.get("quantization") or {}).get("bits")
    linear: dict[str, tuple[int, int]] = {}  # module -> (in, out), as the base has them
    for name, shape in shapes.items():
        match = re.match(r"^model\.layers\.0\.([a-z_0-9.]+)\.weight$", name)
        if match is None or len(shape) != 2:  # norms are 1-D
            continue
        quantized = f"model.layers.0.{match[1]}.scales" in shapes
        if quantized and not bits:
            continue
        linear[match[1]] = (shape[1] * 32 // bits if quantized and bits else shape[1], shape[0])
    rng = np.random.default_rng(seed)
    first = min(layer for layer, _ in pairs)
    weights: dict[str, np.ndarray] = {}
    for (layer, module), pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise PeftImportError(f"{WEIGHTS}: layer {layer} {module} has lora_{''.join(pair)} without its pair")
        if layer >= layers:
            raise PeftImportError(f"{WEIGHTS}: layer {layer} {module}, but the base has {layers} layers")
        if module not in linear:
            raise PeftImportError(f"{WEIGHTS}: the base has no linear layer {module!r} in its blocks")
        want = linear[module]
        got = (pair["A"].shape[1], pair["B"].shape[0])
        if got != want or pair["A"].shape[0] != rank or pair["B"].shape[1] != rank:
            raise PeftImportError(
                f"{WEIGHTS}: layer {layer} {module} maps {got[0]} to {got[1]} at rank {pair['A'].shape[0]};"
                f" the base's maps {want[0]} to {want[1]} at `r` {rank}: the adapter is for another base"
            )
    for layer in range(first, layers):
        for module, (inputs, outputs) in sorted(linear.items()):
            found = pairs.get((layer, module))
            if found is not None:
                a, b = found["A"].T, found["B"].T
            else:  # changes nothing (b is zero); a as mlx-lm initialises it, so that it can train
                bound = 1 / math.sqrt(inputs)
                a = rng.uniform(-bound, bound, (inputs, rank)).astype(np.float32)
                b = np.zeros((rank, outputs), np.float32)
            weights[f"model.layers.{layer}.{module}.lora_a"] = np.ascontiguousarray(a)
            weights[f"model.layers.{layer}.{module}.lora_b"] = np.ascontiguousarray(b)
    save_file(weights, str(out_dir / "adapters.safetensors"))
    adapter_config = {
        "model": base_ref,
        "fine_tune_type": "lora",
        "num_layers": layers - first,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": float(config.get("lora_dropout", 0.0))},
        "imported_from": "peft",
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return {
        "rank": rank,
        "scale": scale,
        "num_layers": layers - first,
        "peft_modules": sorted({module for _, module in pairs}),
        "peft_layers": len({layer for layer, _ in pairs}),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
    }
