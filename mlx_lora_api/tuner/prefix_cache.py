"""Train the last blocks on cached hidden states of the frozen first ones.

When LoRA covers only the last k blocks and dropout is 0, what enters block L-k is the same
every time a batch comes round: the blocks before it are frozen and nothing random happens
there. So it is computed once per batch (the first epoch) and kept, and every step runs only
the last k blocks: from the second epoch on, the forward pass through the frozen blocks
(about 40% of a step for SmolLM2-135M with k=8) is gone. The result is the same adapter (a
test checks it); the cache is used only where a check on the first batch shows the split
forward pass computing what the model computes, and only within a memory budget.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from ..types import Parameters
from . import anatomy
from .losses import Head, Loss, TokenLoss, head_mean, kl_mean, masked_mean

DEFAULT_BUDGET_BYTES = 2 << 30


def frozen_blocks(model: nn.Module, params: Parameters) -> int:
    """How many leading blocks are frozen and deterministic; 0 where the cache cannot apply."""
    if params.fine_tune_type == "full" or params.dropout > 0:
        return 0
    if not anatomy.splittable(model):
        return 0
    inner = model.model
    if getattr(inner, "swa_idx", None) is not None or not hasattr(inner, "embed_tokens"):
        return 0  # sliding-window layers need masks this module does not build
    trainable = [i for i, layer in enumerate(inner.layers) if any(True for _ in _leaves(layer.trainable_parameters()))]
    return min(trainable) if trainable else 0


def _leaves(tree: Any) -> Any:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


def prefix(model: nn.Module, inputs: mx.array, start: int) -> mx.array:
    """Hidden states entering block `start`, for token ids `inputs`."""
    inner = model.model
    h = inner.embed_tokens(inputs)
    mask = create_attention_mask(h, None)
    for layer in inner.layers[:start]:
        h = layer(h, mask, cache=None)
    return mx.stop_gradient(h)


def suffix(model: nn.Module, h: mx.array, start: int, logits: bool = True) -> mx.array:
    """Logits from hidden states entering block `start`: the rest of the model's __call__
    (or, with logits=False, the final hidden states before the output layer)."""
    inner = model.model
    mask = create_attention_mask(h, None)
    for layer in inner.layers[start:]:
        h = layer(h, mask, cache=None)
    h = inner.norm(h)
    if not logits:
        return h
    if anatomy.tied(model):
        return inner.embed_tokens.as_linear(h)
    return model.lm_head(h)


def make_loss(start: int, cross_entropy: TokenLoss | None = None, head: Head | None = None) -> Loss:
    """`losses.make_loss` on (hidden states, tokens, lengths) batches."""

    def loss(model: nn.Module, hidden: mx.array, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        return masked_mean(suffix(model, hidden, start), batch, lengths, cross_entropy)

    def through_head(
        model: nn.Module, hidden: mx.array, batch: mx.array, lengths: mx.array
    ) -> tuple[mx.array, mx.array]:
        assert head is not None
        return head_mean(head, suffix(model, hidden, start, logits=False), batch, lengths)

    return through_head if head is not None else loss


def make_kl_loss(start: int, cross_entropy: TokenLoss | None = None, eager: bool = False) -> Loss:
    """`losses.make_kl_loss` on (hidden states, tokens, lengths) batches: the frozen blocks are the
    same with the adapter on or off, so the base's pass starts from the cached states too."""

    def forward(model: nn.Module, hidden: mx.array) -> mx.array:
        return suffix(model, hidden, start)

    def loss(model: nn.Module, hidden: mx.array, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        return kl_mean(model, forward, hidden, batch, lengths, cross_entropy, eager)

    return loss


class Cache:
    """Hidden states per batch (keyed by the batch's sample indices), computed on first use.

    With keep=False nothing is kept: each batch's frozen blocks run forward on their own,
    outside the training step, which then holds the activations of the trainable blocks only
    (a single epoch, or a cache over budget)."""

    def __init__(self, model: nn.Module, start: int, keep: bool = True):
        self.model = model
        self.start = start
        self.keep = keep
        self._states: dict[tuple[int, ...], mx.array] = {}

    def compute(self, tokens: mx.array) -> mx.array:
        """The hidden states entering block `start` for a batch of `tokens` (B, T+1), evaluated."""
        states = prefix(self.model, tokens[:, :-1], self.start)
        mx.eval(states)
        return states

    def __call__(self, key: tuple[int, ...], tokens: mx.array) -> mx.array:
        states = self._states.get(key)
        if states is None:
            states = self.compute(tokens)
            if self.keep:
                self._states[key] = states
        return states


def fits(padded_tokens: int, hidden_size: int, budget: int | None = None) -> bool:
    return padded_tokens * hidden_size * 4 <= (DEFAULT_BUDGET_BYTES if budget is None else budget)
