"""The training loss: next-token cross-entropy over the real targets of each sample."""

from __future__ import annotations

from .cpu_parallel import split_rows


def token_cross_entropy(logits, targets):
    """Cross-entropy of each position; logits (B, T, V), targets (B, T). On the CPU the rows
    are split over one stream per core: measured 18-20% off a whole step on 2 cores."""
    import mlx.nn as nn

    shape = targets.shape
    flat = split_rows(nn.losses.cross_entropy, logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return flat.reshape(shape)


def target_mask(batch, lengths):
    """Which targets count, (B, T-1).

    mlx-lm's `default_loss` also counts the target one past each sequence's end (a padding
    0), training every sample to predict token 0 after its last token (mlx-lm pull request
    1697). Targets are batch[1:], so step k targets token k; tokens 0..L-1 are real, and the
    last real target is step L-1; steps before a sample's offset are its masked prompt.
    """
    import mlx.core as mx

    steps = mx.arange(1, batch.shape[1])
    return mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])


def masked_mean(logits, batch, lengths):
    """Mean over the targets that count, and their number."""
    import mlx.core as mx

    mask = target_mask(batch, lengths)
    ce = token_cross_entropy(logits, batch[:, 1:]) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


def masked_loss(model, batch, lengths):
    """A drop-in for mlx-lm's `default_loss`, without its off-by-one."""
    return masked_mean(model(batch[:, :-1]), batch, lengths)


def hidden_mean(model, hidden, batch, lengths):
    """`masked_mean` of the logits of the final hidden states `hidden` (B, T-1, D), through
    `cpu_kernels.cross_entropy` (the caller has checked `cpu_kernels.output_weight(model)`)."""
    from . import cpu_kernels

    mask = target_mask(batch, lengths)
    weight = getattr(model, "bf16_output", None) or cpu_kernels.output_weight(model)  # see bf16.matmuls
    ce = cpu_kernels.cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, batch[:, 1:].reshape(-1), mask.reshape(-1)
    )
    ntoks = mask.sum()
    return ce.sum() / ntoks, ntoks


def cpu_head_loss(model, batch, lengths):
    """`masked_loss` with the output layer's softmax taken by numpy (`cpu_kernels`)."""
    return hidden_mean(model, model.model(batch[:, :-1]), batch, lengths)
