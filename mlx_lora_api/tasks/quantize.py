"""A model folder to a new quantized model folder, with mlx-lm's `quantize_model`.

Loaded lazily and saved one tensor at a time (tasks/saving.py): each weight is read, quantized,
written and let go, so the job never holds the whole model, in either precision.

Fine-tuning on the result trains LoRA over the quantized weights (QLoRA): mlx-lm's
`linear_to_lora_layers` wraps `QuantizedLinear` layers as it wraps plain ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_lm.utils import compute_bits_per_weight, load, quantize_model

from . import saving


def quantize(model_dir: Path, out_dir: Path, bits: int, group_size: int) -> dict[str, Any]:
    model, tokenizer, config = load(str(model_dir), return_config=True, lazy=True)
    if config.get("quantization"):
        raise ValueError(f"{model_dir.name} is already quantized ({config['quantization'].get('bits')} bits)")
    model, config = quantize_model(model, config, group_size, bits)
    figures = {"bits": bits, "group_size": group_size, "bits_per_weight": round(compute_bits_per_weight(model), 3)}
    saving.save_model(out_dir, model_dir, model, tokenizer, config)
    return figures
