"""Preference tuning: DPO and ORPO on rows of one prompt with a chosen and a rejected answer.

Each row becomes two chat samples (the prompt's messages, then one answer), tokenized as mlx-lm
tokenizes chat data with `mask_prompt`: only the answer's tokens count. A batch of B rows is one
array of 2B sequences, the chosen answers first, so a step is one forward and one backward pass,
as an SFT step on twice the rows.

- **DPO** (Rafailov et al., 2023): -log σ(β((log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)))),
  log-probs summed over each answer's tokens. The reference is the model as training starts: the
  base (a fresh adapter adds nothing), or the adapter a run resumes from. Its log-probs are
  computed once, before the first step, in one forward pass over the data, and travel with each
  batch: no second copy of the weights and no second pass per step, so a step costs what an SFT
  step on the same tokens does.
- **ORPO** (Hong et al., 2024): the chosen answers' cross-entropy, minus λ·log σ of the log odds
  ratio of chosen over rejected (log-probs averaged per token, as TRL does). No reference.

What DPO users watch comes out of every step beside the loss (`METRICS`): the reward margin and
accuracy, and the chosen and rejected log-probs and rewards. mlx-lm's `train` returns only the
loss and the token count from its compiled step, so preference runs step through `train` below,
which is mlx-lm's loop with the metrics carried out of the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.trainer import grad_checkpoint

from ..types import PREFERENCE_METRICS, Message, Parameters, Sample
from . import datasets, prefix_cache
from .losses import Head, TokenLoss, target_mask, token_cross_entropy

# What every step reports beside the loss, in this order (see `make_loss`).
METRICS = PREFERENCE_METRICS


def as_chats(row: Sample) -> tuple[Sample, Sample]:
    """A preference row as two chat samples: the prompt's messages with the chosen answer, and with the rejected."""
    if row.input is not None:
        prompt = list(row.input.messages)
        chosen, rejected = row.preferred_output or [], row.non_preferred_output or []
    else:
        assert row.prompt is not None and row.chosen is not None and row.rejected is not None
        prompt = [Message("system", row.system)] if row.system else []
        prompt.append(Message("user", row.prompt))
        chosen, rejected = [Message("assistant", row.chosen)], [Message("assistant", row.rejected)]
    return Sample(messages=prompt + list(chosen)), Sample(messages=prompt + list(rejected))


class Pairs:
    """Preference rows as a dataset: item i is (chosen (tokens, offset), rejected (tokens, offset))."""

    def __init__(self, rows: Sequence[Sample], tokenizer):
        chats = [as_chats(row) for row in rows]
        self.chosen = datasets.build([c for c, _ in chats], tokenizer, mask_prompt=True)
        self.rejected = datasets.build([r for _, r in chats], tokenizer, mask_prompt=True)

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, index: int) -> tuple[tuple, tuple]:
        return self.chosen[index], self.rejected[index]

    def lengths(self) -> list[int]:
        """Each row's longer answer, in tokens: what a batch is padded to."""
        return [max(len(c[0]), len(r[0])) for c, r in (self[i] for i in range(len(self)))]


def collate(pairs: Pairs, indices: Sequence[int], max_seq_length: int, pad_multiple: int):
    """One batch: (2B, T) tokens, chosen rows first, and their (2B, 2) [offset, length]."""
    items = [pairs[i] for i in indices]
    return datasets.collate([c for c, _ in items] + [r for _, r in items], max_seq_length, pad_multiple)


class Forward(NamedTuple):
    """How a step gets each answer token's cross-entropy from its inputs: the token ids (`start`
    0) or the hidden states entering block `start` (prefix_cache.Cache), through the model's
    own output layer (with `cross_entropy`, or MLX's) or through `head`, which never forms the
    logits. The levers (levers.plan_preference) choose; the default is the model as it is."""

    start: int = 0
    cross_entropy: TokenLoss | None = None
    head: Head | None = None

    def token_losses(self, model: nn.Module, inputs: mx.array, tokens: mx.array, mask: mx.array) -> mx.array:
        """(B, T-1) cross-entropies of the targets tokens[:, 1:], 0 outside `mask`."""
        if self.start:
            final = prefix_cache.suffix(model, inputs, self.start, logits=self.head is None)
        else:
            final = model.model(inputs) if self.head is not None else model(inputs)
        if self.head is not None:
            flat = self.head(final.reshape(-1, final.shape[-1]), tokens[:, 1:].reshape(-1), mask.reshape(-1))
            return flat.reshape(mask.shape)
        return token_cross_entropy(final, tokens[:, 1:], self.cross_entropy).astype(mx.float32) * mask


MODEL = Forward()  # the model's own forward pass and MLX's cross-entropy


def sequence_logps(
    model: nn.Module, inputs: mx.array, tokens: mx.array, lengths: mx.array, forward: Forward = MODEL
) -> tuple[mx.array, mx.array]:
    """Each row's log-probability of its answer (summed over the answer's tokens), and its token
    count; `inputs` are tokens[:, :-1], or their hidden states entering block `forward.start`."""
    mask = target_mask(tokens, lengths)
    return -forward.token_losses(model, inputs, tokens, mask).sum(axis=1), mask.sum(axis=1)


def dpo_terms(logps: mx.array, reference: mx.array, beta: float) -> tuple[mx.array, mx.array, mx.array]:
    """Per row: DPO's loss, and the chosen and rejected implicit rewards β(log π - log π_ref)."""
    n = logps.shape[0] // 2
    rewards = beta * (logps - reference)
    chosen, rejected = rewards[:n], rewards[n:]
    return -nn.log_sigmoid(chosen - rejected), chosen, rejected


def _log1m_exp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, kept finite where x rounds to 0."""
    return mx.log(-mx.expm1(mx.minimum(x, -1e-6)))


def orpo_terms(logps: mx.array, counts: mx.array, weight: float) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """ORPO's NLL of the chosen answers (per token), its odds-ratio term per row, and the rewards λ·mean log-prob."""
    n = logps.shape[0] // 2
    mean = logps / mx.maximum(counts, 1)
    chosen, rejected = mean[:n], mean[n:]
    nll = -logps[:n].sum() / mx.maximum(counts[:n].sum(), 1)
    log_odds = (chosen - rejected) - (_log1m_exp(chosen) - _log1m_exp(rejected))
    return nll, nn.log_sigmoid(log_odds), weight * chosen, weight * rejected


Loss = Callable[..., tuple[mx.array, mx.array, mx.array]]


def make_loss(params: Parameters, forward: Forward = MODEL) -> Loss:
    """`loss(model, inputs, tokens, lengths, reference) -> (loss, answer tokens, METRICS)` for the
    run's method, on the batches that `batches` yields."""

    def metrics(chosen: mx.array, rejected: mx.array, logps: mx.array) -> mx.array:
        n = logps.shape[0] // 2
        margin = chosen - rejected
        values = [margin.mean(), (margin > 0).astype(mx.float32).mean(), chosen.mean(), rejected.mean()]
        return mx.stack([*values, logps[:n].mean(), logps[n:].mean()])

    def dpo(model, inputs, tokens, lengths, reference):
        logps, counts = sequence_logps(model, inputs, tokens, lengths, forward)
        losses, chosen, rejected = dpo_terms(logps, reference, params.dpo_beta)
        return losses.mean(), counts.sum(), metrics(chosen, rejected, logps)

    def orpo(model, inputs, tokens, lengths, reference):
        logps, counts = sequence_logps(model, inputs, tokens, lengths, forward)
        nll, ratio, chosen, rejected = orpo_terms(logps, counts, params.orpo_weight)
        return (
            nll - params.orpo_weight * ratio.mean(),
            counts.sum(),
            metrics(chosen, rejected, logps / mx.maximum(counts, 1)),
        )

    return dpo if params.method == "dpo" else orpo


def reference_logps(
    model: nn.Module,
    pairs: Pairs,
    batch_size: int,
    max_seq_length: int,
    pad_multiple: int,
    forward: Forward = MODEL,
    cache: prefix_cache.Cache | None = None,
) -> np.ndarray:
    """The model's log-probs of every answer as it is now (DPO's reference): (rows, 2), chosen then rejected."""
    model.eval()
    out = np.zeros((len(pairs), 2), np.float32)
    for indices in datasets.in_order(len(pairs), batch_size):
        tokens, lengths = collate(pairs, indices, max_seq_length, pad_multiple)
        inputs = cache.compute(tokens) if cache is not None else tokens[:, :-1]
        logps = np.array(mx.stop_gradient(sequence_logps(model, inputs, tokens, lengths, forward)[0]))
        out[indices, 0], out[indices, 1] = logps[: len(indices)], logps[len(indices) :]
    model.train()
    return out


def batches(
    pairs: Pairs,
    plan: Sequence[Sequence[int]],
    reference: np.ndarray | None,
    max_seq_length: int,
    pad_multiple: int,
    on_truncate: Callable[[int], None] | None = None,
    cache: prefix_cache.Cache | None = None,
    training: bool = True,
) -> Iterator[tuple[mx.array, mx.array, mx.array, mx.array]]:
    """(inputs, tokens, lengths, reference log-probs) of each step in `plan`: inputs are the
    tokens but the last, or with a `cache` their hidden states entering its first trainable
    block (kept per batch, as SFT's: `training` tells the training set's batches from the
    validation set's). Reference log-probs are zeros without a reference (ORPO)."""
    warned = False
    for indices in plan:
        tokens, lengths = collate(pairs, indices, max_seq_length, pad_multiple)
        inputs = cache((training, *indices), tokens) if cache is not None else tokens[:, :-1]
        longest = max(len(answer[0]) for i in indices for answer in pairs[i])
        if on_truncate and not warned and longest > max_seq_length:
            on_truncate(longest)
            warned = True
        ref = reference[list(indices)].T.reshape(-1) if reference is not None else np.zeros(2 * len(indices))
        yield inputs, tokens, lengths, mx.array(ref.astype(np.float32))


def evaluate(
    model: nn.Module,
    pairs: Pairs,
    loss: Loss,
    reference: np.ndarray | None,
    batch_size: int,
    num_batches: int,
    max_seq_length: int,
    pad_multiple: int,
    cache: prefix_cache.Cache | None = None,
) -> tuple[float, dict[str, float]]:
    """The loss and `METRICS` over the validation rows (the first `num_batches`, -1: all), weighted by rows."""
    model.eval()
    plan = datasets.in_order(len(pairs), batch_size)
    plan = plan if num_batches == -1 else plan[:num_batches]
    total, sums, rows = 0.0, np.zeros(len(METRICS)), 0
    steps = batches(pairs, plan, reference, max_seq_length, pad_multiple, cache=cache, training=False)
    for indices, batch in zip(plan, steps):
        value, _, metrics = loss(model, *batch)
        mx.eval(value, metrics)
        total += float(value.item()) * len(indices)
        sums += np.array(metrics) * len(indices)
        rows += len(indices)
    model.train()
    return total / rows, dict(zip(METRICS, (sums / rows).tolist()))


def train(
    model: nn.Module,
    optimizer,
    loss: Loss,
    steps: Iterator[tuple[mx.array, mx.array, mx.array, mx.array]],
    iters: int,
    adapter_file: str,
    params: Parameters,
    on_report: Callable[[dict[str, Any]], None],
) -> None:
    """mlx-lm's training loop (`mlx_lm.tuner.trainer.train`: compiled step, gradient accumulation,
    the final adapter written to `adapter_file`), with each step's `METRICS` passed to `on_report`
    beside what mlx-lm reports. Steps compile unless compiling is off (the CPU's eager steps)."""
    if params.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    value_and_grad = nn.value_and_grad(model, loss)
    accumulate = params.grad_accumulation_steps
    state = [model.state, optimizer.state, mx.random.state]

    size = mx.distributed.init().size()  # data-parallel ranks: the loss is distributed.weighted's

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, prev_grad, do_update):
        (value, toks, metrics), grad = value_and_grad(model, *batch)
        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)
        if size > 1:  # the whole batch's figures, as mlx-lm's trainer sums them
            value = mx.distributed.all_sum(value, stream=mx.cpu) / size
            toks = mx.distributed.all_sum(toks, stream=mx.cpu)
            metrics = mx.distributed.all_sum(metrics, stream=mx.cpu)
        if do_update:
            grad = average_gradients(grad)
            if accumulate > 1:
                grad = tree_map(lambda x: x / accumulate, grad)
            optimizer.update(model, grad)
            grad = None
        return value, toks, metrics, grad

    model.train()
    trained = 0
    grad = None
    for it, batch in zip(range(1, iters + 1), steps):
        tic = time.perf_counter()
        value, toks, metrics, grad = step(batch, grad, it % accumulate == 0)
        mx.eval(state, value, toks, metrics, grad)
        seconds = time.perf_counter() - tic
        trained += toks.item()
        on_report(
            {
                "iteration": it,
                "train_loss": value.item(),
                "learning_rate": optimizer.learning_rate.item(),
                "tokens_per_second": toks.item() / max(seconds, 1e-9),
                "trained_tokens": trained,
                "peak_memory": mx.get_peak_memory() / 1e9,
                "metrics": dict(zip(METRICS, metrics.tolist())),
            }
        )
    mx.save_safetensors(adapter_file, dict(tree_flatten(model.trainable_parameters())))
