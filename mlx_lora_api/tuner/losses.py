"""The training loss: next-token cross-entropy over the real targets of each sample, and the KL
penalty towards the base (the same model with its adapter switched off) on rehearsal rows.

Plain MLX. Where the CPU fast path computes a part faster, it is passed in explicitly (see
levers.py): the cross-entropy of a block of logits (`TokenLoss`), or the whole output layer
with its cross-entropy (`Head`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

# (N, V) logits and (N,) targets -> (N,) losses.
TokenLoss = Callable[[mx.array, mx.array], mx.array]


class Head(Protocol):
    """The output layer with its cross-entropy: (N, D) final hidden states, (N,) targets and (N,)
    mask -> (N,) losses, 0 outside the mask; `forward_only()`, the same for evaluation, which
    need not prepare a backward pass."""

    def __call__(self, hidden: mx.array, targets: mx.array, mask: mx.array) -> mx.array: ...

    def forward_only(self) -> Head: ...


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
    return mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:2])


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


@contextlib.contextmanager
def adapter_off(model: nn.Module) -> Iterator[None]:
    """The base model, for as long as the block runs: every LoRA layer's scale set to 0 (its
    output is then the frozen layer's alone), as PEFT's `disable_adapter()`. No second copy of
    the weights. Inside a compiled step it is traced as such (the scale is a constant there)."""
    layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear | LoRASwitchLinear | LoRAEmbedding)]
    scales = [layer.scale for layer in layers]
    for layer in layers:
        layer.scale = 0.0
    try:
        yield
    finally:
        for layer, scale in zip(layers, scales):
            layer.scale = scale


def kl_from_base(logits: mx.array, base_logits: mx.array) -> mx.array:
    """KL(base || tuned) of each position's next-token distribution; (B, T, V) -> (B, T)."""
    base = base_logits.astype(mx.float32)
    base_logp = base - mx.logsumexp(base, axis=-1, keepdims=True)
    tuned = logits.astype(mx.float32)
    logp = tuned - mx.logsumexp(tuned, axis=-1, keepdims=True)
    return (mx.exp(base_logp) * (base_logp - logp)).sum(axis=-1)


def kl_mean(
    model: nn.Module,
    forward: Callable[[nn.Module, mx.array], mx.array],
    inputs: mx.array,
    batch: mx.array,
    lengths: mx.array,
    cross_entropy: TokenLoss | None = None,
    eager: bool = False,
) -> tuple[mx.array, mx.array]:
    """`masked_mean` of `forward(model, inputs)`'s logits, except on the rows marked as rehearsal
    (a third column of `lengths`, 1; see datasets.Joined): there, at each answer token, the KL
    divergence of the model's next-token distribution from the base's (the adapter switched off,
    no gradient) rather than the cross-entropy to the base's greedy answer. Both are nats per
    token, averaged together.

    The base's whole distribution is the target, not only its choice: the model is held to how
    sure the base was, not just to what it said. The base's pass is one more forward pass (no
    backward): over the marked rows only where steps run `eager`, over the whole batch in a
    compiled step (which cannot pick rows by value)."""
    logits = forward(model, inputs)
    mask = target_mask(batch, lengths)
    ce = token_cross_entropy(logits, batch[:, 1:], cross_entropy).astype(mx.float32)
    if lengths.shape[1] > 2:
        marked = lengths[:, 2] > 0
        if not eager:
            with adapter_off(model):
                base = mx.stop_gradient(forward(model, inputs))
            ce = mx.where(marked[:, None], kl_from_base(logits, base), ce)
        elif (rows := mx.array([i for i, m in enumerate(marked.tolist()) if m])).size:
            with adapter_off(model):
                base = mx.stop_gradient(forward(model, inputs[rows]))
            kl = mx.zeros_like(ce).at[rows].add(kl_from_base(logits[rows], base))
            ce = mx.where(marked[:, None], kl, ce)
    ntoks = mask.sum()
    return (ce * mask).sum() / ntoks, ntoks


def make_kl_loss(cross_entropy: TokenLoss | None = None, eager: bool = False) -> Loss:
    """`kl_mean` on (tokens, lengths) batches: `masked_loss` with the KL penalty on rehearsal rows."""

    def loss(model: nn.Module, batch: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        return kl_mean(model, _call, batch[:, :-1], batch, lengths, cross_entropy, eager)

    return loss


def _call(model: nn.Module, inputs: mx.array) -> mx.array:
    return model(inputs)
