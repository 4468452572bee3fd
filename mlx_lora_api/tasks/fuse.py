"""Fuse an adapter into its base with mlx-lm (each LoRA layer's `fuse()`), check that the
fused model computes what base plus adapter computed, and save it with `mlx_lm.utils.save`
in the base's own dtype (computed in float32 on the CPU, as mlx_lm.fuse saves, at half the size
of float32 for a float16 base)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import dequantize_model, load, save

from .. import device

# Probes for the parity check: fixed, short, and in the shapes the model will see.
PARITY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France?\nAnswer:",
    "def add(a, b):\n    return a + b\n",
)
# Largest logit difference allowed, relative to the largest logit, by the fused model's dtype.
PARITY_RTOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


class ParityError(RuntimeError):
    pass


def _logits(model: nn.Module, token_lists: list[list[int]]) -> list[mx.array]:
    return [model(mx.array([tokens]))[0].astype(mx.float32) for tokens in token_lists]


def _weights_dtype(model: nn.Module) -> str:
    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return str(value.dtype).removeprefix("mlx.core.")
    return "float32"


def fuse_adapter(
    base_path: str,
    adapter_path: Path,
    out_dir: Path,
    dequantize: bool = False,
    on_event: Callable[[dict], None] = lambda event: None,
) -> dict[str, Any]:
    """Write the fused model into `out_dir` (which exists); returns the parity figures."""
    on_event({"type": "loading", "base_model": base_path, "adapter": str(adapter_path)})
    model, tokenizer, config = load(base_path, adapter_path=str(adapter_path), return_config=True)
    stored = _weights_dtype(model)  # as the base is on disk: the fused model is saved so too
    device.cast_for_compute(model)
    model.eval()

    probes = [tokenizer.encode(text) for text in PARITY_TEXTS]
    reference = _logits(model, probes)
    mx.eval(reference)

    on_event({"type": "fusing"})
    fused = [
        (name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules() if hasattr(module, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)

    dtype = _weights_dtype(model)
    result = _logits(model, probes)
    largest_diff = max(mx.max(mx.abs(a - b)).item() for a, b in zip(reference, result))
    largest_logit = max(mx.max(mx.abs(a)).item() for a in reference)
    tolerance = PARITY_RTOL.get(dtype, 5e-2) * max(largest_logit, 1.0)
    parity = {
        "max_abs_logit_diff": largest_diff,
        "max_abs_logit": largest_logit,
        "tolerance": tolerance,
        "dtype": dtype,
        "saved_dtype": stored,
        "probes": len(probes),
        "fused_layers": len(fused),
    }
    if largest_diff > tolerance:
        hint = ""
        if config.get("quantization"):
            hint = (
                "; the base is quantized, and re-quantizing the fused weights loses the adapter: fuse with dequantize"
            )
        raise ParityError(
            f"the fused model's logits differ from base plus adapter by {largest_diff:.4g} "
            f"(tolerance {tolerance:.4g} for {dtype}); not saving it{hint}"
        )
    on_event({"type": "saving", **parity})
    if stored != dtype:
        model.set_dtype(getattr(mx, stored))  # computed in float32 on the CPU, stored as the base was
    config["torch_dtype"] = stored
    save(out_dir, base_path, model, tokenizer, config, donate_model=False)
    return parity
