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

import logging

log = logging.getLogger("mlx_lora_api")

DEFAULT_BUDGET_BYTES = 2 << 30
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")  # model(x) = output layer(model.model(x)), no scaling


def frozen_blocks(model, params) -> int:
    """How many leading blocks are frozen and deterministic; 0 where the cache cannot apply."""
    if params.fine_tune_type == "full" or params.dropout > 0:
        return 0
    inner = getattr(model, "model", None)
    if getattr(model, "model_type", None) not in SUPPORTED or inner is None:
        return 0
    if getattr(inner, "swa_idx", None) is not None or not hasattr(inner, "embed_tokens"):
        return 0  # sliding-window layers need masks this module does not build
    trainable = [i for i, layer in enumerate(inner.layers) if any(True for _ in _leaves(layer.trainable_parameters()))]
    return min(trainable) if trainable else 0


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


def prefix(model, inputs, start: int):
    """Hidden states entering block `start`, for token ids `inputs`."""
    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask

    inner = model.model
    h = inner.embed_tokens(inputs)
    mask = create_attention_mask(h, None)
    for layer in inner.layers[:start]:
        h = layer(h, mask, cache=None)
    return mx.stop_gradient(h)


def suffix(model, h, start: int, logits: bool = True):
    """Logits from hidden states entering block `start`: the rest of the model's __call__
    (or, with logits=False, the final hidden states before the output layer)."""
    from mlx_lm.models.base import create_attention_mask

    inner = model.model
    mask = create_attention_mask(h, None)
    for layer in inner.layers[start:]:
        h = layer(h, mask, cache=None)
    h = inner.norm(h)
    if not logits:
        return h
    if getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return inner.embed_tokens.as_linear(h)
    return model.lm_head(h)


def make_loss(start: int, cpu_head: bool = False):
    """losses.masked_loss on (hidden states, tokens, lengths) batches; with `cpu_head`, through
    `losses.hidden_mean` (cpu_kernels' output layer)."""
    from .losses import hidden_mean, masked_mean

    def loss(model, hidden, batch, lengths):
        return masked_mean(suffix(model, hidden, start), batch, lengths)

    def head_loss(model, hidden, batch, lengths):
        return hidden_mean(model, suffix(model, hidden, start, logits=False), batch, lengths)

    return head_loss if cpu_head else loss


class Cache:
    """Hidden states per batch (keyed by the batch's sample indices), computed on first use.

    With keep=False nothing is kept: each batch's frozen blocks run forward on their own,
    outside the training step, which then holds the activations of the trainable blocks only
    (a single epoch, or a cache over budget)."""

    def __init__(self, model, start: int, keep: bool = True):
        self.model = model
        self.start = start
        self.keep = keep
        self._states: dict[tuple[int, ...], object] = {}
        self.nbytes = 0

    def compute(self, tokens):
        """The hidden states entering block `start` for a batch of `tokens` (B, T+1), evaluated."""
        import mlx.core as mx

        states = prefix(self.model, tokens[:, :-1], self.start)
        mx.eval(states)
        return states

    def __call__(self, key: tuple[int, ...], tokens):
        states = self._states.get(key)
        if states is None:
            states = self.compute(tokens)
            if self.keep:
                self._states[key] = states
                self.nbytes += states.nbytes
        return states


def fits(padded_tokens: int, hidden_size: int, budget: int = DEFAULT_BUDGET_BYTES) -> bool:
    return padded_tokens * hidden_size * 4 <= budget
