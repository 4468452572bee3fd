"""What the tuner's shortcuts need to know of a model's build: whether `model(x)` is the output
layer of `model.model(x)` and nothing more, and which weight that output layer multiplies by."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")  # model(x) = output layer(model.model(x)), no scaling


def splittable(model: nn.Module) -> bool:
    return getattr(model, "model_type", None) in SUPPORTED and getattr(model, "model", None) is not None


def tied(model: nn.Module) -> bool:
    """Whether the output layer is the token embedding (`embed_tokens.as_linear`)."""
    return getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head")


def output_weight(model: nn.Module) -> mx.array | None:
    """The (vocab, hidden) weight of `model`'s output layer where logits are exactly
    `hidden @ weight.T` and the weight is frozen float32; else None."""
    if not splittable(model):
        return None
    kind: type[nn.Module]
    if tied(model):
        layer, kind = getattr(model.model, "embed_tokens", None), nn.Embedding
    else:
        layer, kind = model.lm_head, nn.Linear
    if type(layer) is not kind or "bias" in layer or layer.weight.dtype != mx.float32:
        return None  # quantized, wrapped by LoRA, with a bias, or not float32
    if "weight" in layer.trainable_parameters():
        return None  # a full fine-tune trains it: a head of its own gives no gradient for the weight
    return layer.weight
