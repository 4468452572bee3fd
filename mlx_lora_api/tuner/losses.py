"""The training loss: next-token cross-entropy over the real targets of each sample.

Plain MLX. Where the CPU fast path computes a part faster, it is passed in explicitly (see
levers.py): the cross-entropy of a block of logits (`TokenLoss`), or the whole output layer
with its cross-entropy (`Head`).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

# (N, V) logits and (N,) targets -> (N,) losses.
TokenLoss = Callable[[mx.array, mx.array], mx.array]
# (N, D) final hidden states, (N,) targets and (N,) mask -> (N,) losses, 0 outside the mask.
Head = Callable[[mx.array, mx.array, mx.array], mx.array]
Loss = Callable[..., tuple[mx.array, mx.array]]


def token_cross_entropy(logits: mx.array, targets: mx.array, cross_entropy: TokenLoss | None = None) -> mx.array:
    """Cross-entropy of each position; logits (B, T, V), targets (B, T)."""
    shape = targets.shape
    flat = (cross_entropy or nn.losses.cross_entropy)(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return flat.reshape(shape)


def target_mask(batch: mx.array, lengths: mx.array) -> mx.array:
    """Which targets count, (B, T-1).

    mlx-lm's `default_loss` also counts the target one past each sequence's end (a padding
    0), training every sample to predict token 0 after its last token (mlx-lm pull request
    1697). Targets are batch[1:], so step k targets token k; tokens 0..L-1 are real, and the
    last real target is step L-1; steps before a sample's offset are its masked prompt.
    """
    steps = mx.arange(1, batch.shape[1])
    return mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])


def masked_mean(
    logits: mx.array, batch: mx.array, lengths: mx.array, cross_entropy: TokenLoss | None = None
) -> tuple[mx.array, mx.array]:
    """Mean over the targets that count, and their number."""
    mask = target_mask(batch, lengths)
    ce = token_cross_entropy(logits, batch[:, 1:], cross_entropy) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


def head_mean(head: Head, hidden: mx.array, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
    """`masked_mean` of the logits of the final hidden states `hidden` (B, T-1, D), through `head`."""
    mask = target_mask(batch, lengths)
    ce = head(hidden.reshape(-1, hidden.shape[-1]), batch[:, 1:].reshape(-1), mask.reshape(-1))
    ntoks = mask.sum()
    return ce.sum() / ntoks, ntoks


def masked_loss(model: nn.Module, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
    """A drop-in for mlx-lm's `default_loss`, without its off-by-one."""
    return masked_mean(model(batch[:, :-1]), batch, lengths)


def make_loss(cross_entropy: TokenLoss | None = None, head: Head | None = None) -> Loss:
    """`masked_loss` with its cross-entropy, or its whole output layer (`head`), computed so."""

    def loss(model: nn.Module, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        return masked_mean(model(batch[:, :-1]), batch, lengths, cross_entropy)

    def through_head(model: nn.Module, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        assert head is not None
        return head_mean(head, model.model(batch[:, :-1]), batch, lengths)

    if head is not None:
        return through_head
    return loss if cross_entropy is not None else masked_loss
