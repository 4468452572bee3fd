"""Fuse an adapter into its base with mlx-lm (each LoRA layer's `fuse()`), check that the fused
model computes what base plus adapter computed, and save it in the base's own dtype as
`mlx_lm.utils.save` would.

The check is made layer by layer: every fused layer's output on a fixed random batch against the
LoRA layer's own, both computed in float32 (the layer's weights cast for that one layer), the fused
weights rounded to the dtype they are saved in. The base is loaded lazily and nothing is computed
until the save (tasks/saving.py) evaluates each weight, with its layer's check, writes it and lets
it go: the job never holds the whole model, no float32 copy of it and no forward pass of the whole
model twice (less time and memory than `mlx_lm.fuse`: scripts/bench_fuse.py). A failed check
leaves no weights behind. Each layer's result is exactly the quantity a whole-model check samples,
and where the fused weights cannot hold the adapter (a quantized base re-quantized) its layers fail
the check. LoRA layers of other kinds (mixture-of-experts) are checked as before: the whole model's
logits on a few probes, before and after, in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear
from mlx_lm.utils import dequantize_model, load, save

from .. import device
from . import saving

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


# Largest difference allowed in a fused layer's output, relative to the largest output, by the dtype
# the fused weights are saved in (a weight rounded to float16 is off by 2^-11 of itself).
LAYER_RTOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}
BATCH = 8  # rows of the fixed random batch each fused layer is checked on


def _layer_check(module: nn.Module, dequantize: bool, stored: str, key: mx.array) -> tuple[nn.Module, mx.array] | None:
    """`module` fused, and its output's largest difference from the LoRA layer's, relative to the
    largest output (not evaluated yet); None for a kind of layer this check cannot drive."""
    ids = isinstance(module, LoRAEmbedding | DoRAEmbedding)
    if isinstance(module, LoRALinear | DoRALinear):
        x = mx.random.normal((BATCH, module.lora_a.shape[0]), key=key)
    elif ids:
        x = mx.random.randint(0, module.lora_a.shape[0], (BATCH,), key=key)
    else:
        return None
    module.set_dtype(mx.float32)  # this layer only (quantized weights stay as they are)
    expected = module(x).astype(mx.float32)
    layer = module.fuse(dequantize=dequantize)
    if stored != "float32":
        layer.set_dtype(getattr(mx, stored))
    got = layer(x if ids else x.astype(getattr(mx, stored))).astype(mx.float32)
    return layer, mx.max(mx.abs(got - expected)) / mx.maximum(mx.max(mx.abs(expected)), 1e-6)


def _module_at(model: nn.Module, name: str) -> nn.Module:
    """The module at a dotted path (`model.layers.3.mlp.up_proj`)."""
    found: Any = model
    for part in name.split("."):
        found = found[int(part)] if isinstance(found, list) else getattr(found, part)
    return found


def fuse_adapter(
    base_path: str,
    adapter_path: Path,
    out_dir: Path,
    dequantize: bool = False,
    on_event: Callable[[dict], None] = lambda event: None,
) -> dict[str, Any]:
    """Write the fused model into `out_dir` (which exists); returns the parity figures."""
    on_event({"type": "loading", "base_model": base_path, "adapter": str(adapter_path)})
    # Lazily: every weight stays a read from the base's file until it is saved (tasks/saving.py).
    model, tokenizer, config = load(base_path, adapter_path=str(adapter_path), return_config=True, lazy=True)
    stored = _weights_dtype(model)  # as the base is on disk: the fused model is saved so too
    model.eval()
    on_event({"type": "fusing"})
    names = [name for name, module in model.named_modules() if hasattr(module, "fuse")]
    key = mx.random.key(0)
    differences: dict[str, mx.array] = {}
    for name in names:
        done = _layer_check(_module_at(model, name), dequantize, stored, key)
        if done is None:  # a layer the check cannot drive: the whole model, before and after
            model, tokenizer, config = load(base_path, adapter_path=str(adapter_path), return_config=True)
            return _fuse_whole(model, tokenizer, config, base_path, out_dir, dequantize, stored, on_event)
        model.update_modules(tree_unflatten([(name, done[0])]))
        differences[name] = done[1]
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    parity = {
        "measure": "each fused layer's output on a random batch, relative to its largest",
        "max_diff": 0.0,
        "tolerance": LAYER_RTOL.get(stored, 3e-2),
        "dtype": stored,
        "saved_dtype": stored,
        "fused_layers": len(names),
    }

    def check() -> None:  # once every weight is written, and every difference evaluated with its weight
        parity["max_diff"] = max((float(difference.item()) for difference in differences.values()), default=0.0)
        _refuse_if(parity["max_diff"] > parity["tolerance"], parity, config)

    on_event({"type": "saving", "dtype": stored, "fused_layers": len(names)})
    config["torch_dtype"] = stored
    with_each = {f"{name}.weight": [difference] for name, difference in differences.items()}
    saving.save_model(out_dir, Path(base_path), model, tokenizer, config, with_each=with_each, before_commit=check)
    return parity


def _refuse_if(broken: bool, parity: dict[str, Any], config: dict[str, Any]) -> None:
    if not broken:
        return
    hint = ""
    if config.get("quantization"):
        hint = "; the base is quantized, and re-quantizing the fused weights loses the adapter: fuse with dequantize"
    raise ParityError(
        f"the fused model's outputs differ from base plus adapter by {parity['max_diff']:.4g} "
        f"(tolerance {parity['tolerance']:.4g} for {parity['dtype']}; {parity['measure']}); not saving it{hint}"
    )


def _fuse_whole(model, tokenizer, config, base_path, out_dir, dequantize, stored, on_event) -> dict[str, Any]:
    """The whole-model check: logits on PARITY_TEXTS before and after, in float32 on the CPU."""
    device.cast_for_compute(model)
    model.eval()
    probes = [tokenizer.encode(text) for text in PARITY_TEXTS]
    reference = _logits(model, probes)
    mx.eval(reference)
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
    parity = {
        "measure": "the logits of a few probes, the largest difference",
        "max_diff": largest_diff,
        "tolerance": PARITY_RTOL.get(dtype, 5e-2) * max(largest_logit, 1.0),
        "max_abs_logit": largest_logit,
        "dtype": dtype,
        "saved_dtype": stored,
        "probes": len(probes),
        "fused_layers": len(fused),
    }
    _refuse_if(largest_diff > parity["tolerance"], parity, config)
    on_event({"type": "saving", **parity})
    if stored != dtype:
        model.set_dtype(getattr(mx, stored))  # computed in float32 on the CPU, stored as the base was
    config["torch_dtype"] = stored
    save(out_dir, base_path, model, tokenizer, config, donate_model=False)
    return parity
