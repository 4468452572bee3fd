"""An adapter as a Hugging Face PEFT folder: `adapter_config.json` and `adapter_model.safetensors`,
which `peft.PeftModel.from_pretrained` loads over the transformers base.

mlx-lm's LoRA layer computes `x W^T + scale * (x A) B` with `A` (in, r) and `B` (r, out); PEFT's,
`x W^T + (alpha / r) * x A'^T B'^T` with `lora_A.weight` (r, in) and `lora_B.weight` (out, r). So
PEFT's tensors are mlx-lm's transposed, and `lora_alpha` is `scale * r`. The keys are PEFT's,
`base_model.model.<the module's path>.lora_A.weight`: mlx-lm's module paths are transformers'
for the architectures it shares with it (llama, qwen2, mistral, ...). `target_modules` and
`layers_to_transform` say which modules of which blocks carry the adapter, as mlx-lm's
`num_layers` chose them. LoRA only: mlx-lm's DoRA keeps its magnitude in another form.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from safetensors.numpy import save_file

from .gguf_metadata import ExportError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^(model\.layers\.(\d+)\.(?:[a-z_]+\.)*([a-z_0-9]+))\.lora_([ab])$")


def peft_tensors(weights: dict[str, mx.array]) -> tuple[dict[str, np.ndarray], list[str], list[int]]:
    """mlx-lm's adapter tensors under PEFT's names and layouts, the target modules and the layers."""
    tensors: dict[str, np.ndarray] = {}
    modules: set[str] = set()
    layers: set[int] = set()
    for key, value in weights.items():
        match = _KEY.match(key)
        if match is None:
            raise ExportError(f"PEFT export handles LoRA layers of the transformer blocks; {key!r} is not one")
        path, layer, module, which = match.groups()
        name = f"base_model.model.{path}.lora_{which.upper()}.weight"
        tensors[name] = np.ascontiguousarray(np.asarray(value.astype(mx.float32)).T)
        modules.add(module)
        layers.add(int(layer))
    return tensors, sorted(modules), sorted(layers)


def peft_config(config: dict[str, Any], modules: list[str], layers: list[int], base: str) -> dict[str, Any]:
    lora = config["lora_parameters"]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora["rank"],
        "lora_alpha": lora["scale"] * lora["rank"],
        "lora_dropout": lora.get("dropout", 0.0),
        "target_modules": modules,
        "layers_to_transform": layers,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def export_peft(adapter_dir: Path, out_dir: Path, base: str) -> dict[str, Any]:
    """Write the PEFT folder's two files into `out_dir`; `base` is what its config names as the base
    (a Hugging Face repo id where the lineage knows one)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ExportError(f"PEFT export handles LoRA adapters; this one is {kind}")
    weights: dict[str, mx.array] = dict(mx.load(str(adapter_dir / "adapters.safetensors")))  # a .safetensors file
    tensors, modules, layers = peft_tensors(weights)
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    (out_dir / CONFIG).write_text(json.dumps(peft_config(config, modules, layers, base), indent=2))
    return {"files": [CONFIG, WEIGHTS], "target_modules": modules, "layers": len(layers), "tensors": len(tensors)}
