"""Different LoRA adapters of one base in one batch, as LoRAX serves them: the adapters laid side
by side over the base, each row of a batch adding its own adapter's product (or none).

Each adapted linear layer becomes a `MixedLoRALinear`: the adapters' `a` matrices side by side in
one array, their `b` matrices stacked in another, every adapter in the same columns of every
layer (zeros where it does not adapt that layer). For a call, `Mixture.select` sets which
adapter each row uses: a (rows, columns) mask of ones over that adapter's columns, and the row's
scale. A layer then computes, for all rows at once,

    y + row_scale * (((x @ a) * mask) @ b)

which for a row with adapter k is `y + scale_k * (x @ a_k) @ b_k`, mlx-lm's `LoRALinear`, up to
the order in which the product over the columns adds the other adapters' zeros (and, on the CPU,
which kernel multiplies: the matrices are kept as transposed views, as the base's weights are, so
that a few rows' products go to accel/gemv.c's `few_rows` rather than a threaded `sgemm`): the
same tokens, logits within float rounding (tests/test_generation.py: bit for bit on its tiny
model; on SmolLM2-135M within 6e-5, as a batch of the base alone is). A row of the base alone has a
zero scale: exactly `y`.

Adapters that are not plain LoRA over linear layers (DoRA, an adapted embedding, a full
fine-tune) are not mixed: tasks/generate.py gives them a batch of their own.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from .. import device
from . import checks


def mixable(adapter_path: str) -> bool:
    """A LoRA adapter whose every weight belongs to a linear layer, read from its config and its
    weights file's header (no weights loaded). False for missing or broken files too: laid over
    the base on its own (tasks/generate.py), the adapter's checks then say what is wrong."""
    folder = Path(adapter_path)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        if not isinstance(config, dict) or config.get("fine_tune_type", "lora") != "lora" or config.get("use_dora"):
            return False
        with open(folder / "adapters.safetensors", "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            names = [name for name in json.loads(f.read(length)) if name != "__metadata__"]
        return all(name.endswith((".lora_a", ".lora_b")) and "embed" not in name for name in names)
    except (OSError, ValueError, struct.error, TypeError, AttributeError):
        return False


def _dimensions(linear: nn.Module) -> tuple[int, int]:
    """A linear layer's (inputs, outputs), quantized or not."""
    if isinstance(linear, nn.QuantizedLinear):
        return linear.scales.shape[1] * linear.group_size, linear.scales.shape[0]
    outputs, inputs = linear.weight.shape
    return inputs, outputs


class MixedLoRALinear(nn.Module):
    """A linear layer plus, for each row, its own adapter's LoRA product (see the module's doc)."""

    def __init__(self, linear: nn.Module, mixture: Mixture, lora_a: mx.array, lora_b: mx.array):
        super().__init__()
        self.linear = linear
        self.mixture = mixture
        self.lora_a = lora_a
        self.lora_b = lora_b

    def __call__(self, x):
        y = self.linear(x)
        mask, scale = self.mixture.mask, self.mixture.scale
        if x.ndim == 3:  # (rows, tokens, features): the same mask for each of a row's tokens
            mask, scale = mask[:, None, :], scale[:, None, :]
        z = ((x @ self.lora_a) * mask) @ self.lora_b
        return y + (scale * z).astype(x.dtype)


class Mixture:
    """The adapters laid side by side over one model, and which one each row of its next call
    uses: the record `MixedLoRALinear` layers and tasks/decoding.py's step read."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.paths: list[str] = []
        self.columns: list[tuple[int, int]] = []  # each adapter's columns of every `a` and `b`
        self.scales: list[float] = []
        self.width = 0
        self.mask = mx.zeros((1, 0))
        self.scale = mx.zeros((1, 1))

    def slot(self, adapter_path: str) -> int:
        """The adapter's index, laying it beside the others the first time."""
        if adapter_path in self.paths:
            return self.paths.index(adapter_path)
        folder = Path(adapter_path)
        checks.check_adapter_folder(folder)
        if not mixable(adapter_path):
            raise ValueError(f"{adapter_path}: not a LoRA adapter of linear layers, which cannot share a batch")
        config = json.loads((folder / "adapter_config.json").read_text())
        scale = config.get("lora_parameters", {}).get("scale")
        if not isinstance(scale, (int, float)):
            raise ValueError(f"{adapter_path}: adapter_config.json has no lora_parameters.scale")
        weights = mx.load(str(folder / "adapters.safetensors"))
        pairs: dict[str, dict[str, mx.array]] = {}
        for name, array in weights.items():
            module, leaf = name.rsplit(".", 1)
            pairs.setdefault(module, {})[leaf] = array
        modules = dict(self.model.named_modules())
        ranks = set()
        for name, pair in pairs.items():
            layer = modules.get(name)
            base = layer.linear if isinstance(layer, MixedLoRALinear) else layer
            if not isinstance(base, (nn.Linear, nn.QuantizedLinear)) or set(pair) != {"lora_a", "lora_b"}:
                raise ValueError(f"{adapter_path}: {name} is not a linear layer of this base")
            inputs, outputs = _dimensions(base)
            a, b = pair["lora_a"], pair["lora_b"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != inputs or b.shape[1] != outputs or a.shape[1] != b.shape[0]:
                raise ValueError(f"{adapter_path}: {name}'s LoRA weights do not fit this base's layer")
            ranks.add(a.shape[1])
        if len(ranks) != 1:
            raise ValueError(f"{adapter_path}: the adapter holds no weights, or weights of different ranks")
        (rank,) = ranks
        # Every array is made before any layer changes: an adapter that cannot be laid leaves the others as they were.
        start, end = self.width, self.width + rank
        wrapped = {name for name, m in modules.items() if isinstance(m, MixedLoRALinear)}
        laid = {}
        for name in sorted(wrapped | set(pairs)):
            layer = modules[name]
            inputs, outputs = _dimensions(layer.linear if name in wrapped else layer)
            a, b = (
                (layer.lora_a, layer.lora_b)
                if name in wrapped
                else (mx.zeros((inputs, start)), mx.zeros((start, outputs)))
            )
            new_a, new_b = (
                (pairs[name]["lora_a"], pairs[name]["lora_b"])
                if name in pairs
                else (mx.zeros((inputs, rank)), mx.zeros((rank, outputs)))
            )
            # Kept as transposed views of contiguous arrays, as the base's weights are: a product of a
            # few rows by them is accel/gemv.c's `few_rows` on the CPU, not a threaded sgemm.
            laid[name] = (
                mx.concatenate([a.T, new_a.T.astype(a.dtype)]).T,
                mx.concatenate([b.T, new_b.T.astype(b.dtype)], axis=1).T,
            )
        replaced = []
        for name, (a, b) in laid.items():
            if name in wrapped:
                modules[name].lora_a, modules[name].lora_b = a, b
            else:
                replaced.append((name, MixedLoRALinear(modules[name], self, a, b)))
        if replaced:
            self.model.update_modules(tree_unflatten(replaced))
        device.cast_for_compute(self.model)
        mx.eval(self.model.parameters())
        self.paths.append(adapter_path)
        self.columns.append((start, end))
        self.scales.append(float(scale))
        self.width = end
        return len(self.paths) - 1

    def select(self, slots: list[int | None]) -> None:
        """Each row's adapter (None: the base alone) for the next call."""
        mask = np.zeros((len(slots), self.width), np.float32)
        scale = np.zeros((len(slots), 1), np.float32)
        for row, slot in enumerate(slots):
            if slot is not None:
                start, end = self.columns[slot]
                mask[row, start:end] = 1.0
                scale[row] = self.scales[slot]
        self.mask, self.scale = mx.array(mask), mx.array(scale)
