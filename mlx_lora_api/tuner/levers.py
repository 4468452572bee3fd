"""Which speed-ups apply to this run on this device: the one place the tuner asks, and the only
module of it that touches the CPU fast path (`accel/`).

Each lever is exact (tests train with and without and compare the adapters) and on by default;
`MLX_LORA_API_LEVERS=off`, or `PLAIN` passed to `train_adapter`, switches all of them off, and a
step then computes what mlx-lm's trainer computes, as mlx-lm does it (scripts/bench_train.py's
`service_plain` engine). What applies comes back as a `LossPlan`: the loss function, the cache
of the frozen blocks, whether steps run eagerly, and the context the steps run in. Nothing is
left on the model for another module to find.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import msgspec
import numpy as np

from .. import device
from ..types import Parameters
from . import anatomy, datasets, losses, preference, prefix_cache
from .losses import Head, Loss, TokenLoss

ENV = "MLX_LORA_API_LEVERS"
EventSink = Callable[[dict[str, Any]], None]


class Levers(msgspec.Struct, frozen=True):
    """The switches: what a run may use where it applies."""

    # Batches are padded to a multiple of this, plus one (mlx-lm: 32). None: 1 with eager steps,
    # which cost nothing per new shape (chat 3 epochs 343 -> 420 tok/s), else datasets.PAD_MULTIPLE
    # (each new shape retraces a compiled step).
    pad_multiple: int | None = None
    prefix_cache: bool = True  # cache the frozen blocks' outputs (also needs params.prefix_cache)
    cpu_head: bool = True  # the output layer's softmax in numpy (CPU only; accel/kernels.py)
    cpu_ops: bool = True  # attention's and SwiGLU's in numpy, eager steps; MLX's cross-entropy over the cores
    keep_freed_memory: bool = True  # glibc keeps freed memory (CPU only; accel/blas.py)
    # Decoding reads a float16/bfloat16 copy of each weight that is exactly one (CPU; accel/gemv.c).
    half_weights: bool = True
    # Generation keeps its latest answers' keys and values for prompts that begin alike (tasks/generate.py).
    kept_prompts: bool = True
    # MLX's compiled element-wise kernels built with AVX2, FMA and F16C where the CPU has them
    # (x86_64 Linux; accel/jit.py). Set per process, from the environment, before MLX compiles.
    jit_avx2: bool = True
    # Attention's softmax compiled in decoding and in reading prompts, the same bits (tasks/decoding.py).
    compiled_attention: bool = True


PLAIN = Levers(
    pad_multiple=32,
    prefix_cache=False,
    cpu_head=False,
    cpu_ops=False,
    keep_freed_memory=False,
    half_weights=False,
    kept_prompts=False,
    jit_avx2=False,
    compiled_attention=False,
)


SWITCHES = tuple(name for name in Levers.__struct_fields__ if name != "pad_multiple")


def from_environment(environ: Mapping[str, str] = os.environ) -> Levers:
    """Every lever; none with `MLX_LORA_API_LEVERS=off`; all but some with `no-` and their names,
    comma-separated (`MLX_LORA_API_LEVERS=no-half_weights`), to measure one against the rest."""
    value = environ.get(ENV, "on").strip().lower()
    if value in ("on", "off"):
        return PLAIN if value == "off" else Levers()
    switched_off = {}
    for part in value.split(","):
        name = part.strip().removeprefix("no-")
        if not part.strip().startswith("no-") or name not in SWITCHES:
            raise ValueError(f"{ENV}={value!r}: use on, off, or no-<lever>[,no-<lever>] of {', '.join(SWITCHES)}")
        switched_off[name] = False
    return Levers(**switched_off)


def half_weights(weights: Sequence[mx.array]) -> Any:
    """Exact half-precision copies of those float32 weights (2-D, row-major) whose every value is a
    float16 or a bfloat16, which products of 1 to 8 rows then read in their place (accel/gemv.c):
    what decoding reads from memory, halved, the values the same. Returns what keeps them (with
    `count`, `nbytes` and `kinds`), to hold as long as the weights; None where none apply (the
    lever off, not the CPU, no shim)."""
    if not from_environment().half_weights or not device.on_cpu():
        return None
    from ..accel import blas

    return blas.half_shadows(np.asarray(memoryview(w)) for w in weights)


class LossPlan(msgspec.Struct):
    """How the steps compute the loss: `loss(model, *batch)` on the batches that
    `make_iterate_batches(..., prefix_cache=cache)` yields, compiled (as mlx-lm does) or not,
    inside `running()`."""

    loss: Loss | preference.Loss
    cache: prefix_cache.Cache | None = None
    eager: bool = False
    pad_multiple: int = datasets.PAD_MULTIPLE
    start: int = 0  # the first block that runs in a step (the ones before: `cache`)
    cross_entropy: TokenLoss | None = None
    head: Head | None = None
    running: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    kl: bool = False  # the KL penalty on rehearsal rows (Parameters.rehearsal_loss)
    preference: Parameters | None = None  # a preference run's: its loss is tuner/preference.py's

    def with_head(self, head: Head) -> LossPlan:
        if self.kl:
            return self
        if self.preference is not None:
            forward = preference.Forward(self.start, self.cross_entropy, head)
            return msgspec.structs.replace(self, head=head, loss=preference.make_loss(self.preference, forward))
        return msgspec.structs.replace(self, head=head, loss=_loss(self.start, self.cross_entropy, head))

    def evaluating(self) -> LossPlan:
        """This plan for passes that take no gradient (validation, DPO's reference): its output
        layer then does not prepare one."""
        return self.with_head(self.head.forward_only()) if self.head is not None else self


def _loss(
    start: int, cross_entropy: TokenLoss | None, head: Head | None, kl: bool = False, eager: bool = False
) -> Loss:
    if kl:  # the KL penalty on rehearsal rows (losses.kl_mean): whole logits, never `head`
        return (
            prefix_cache.make_kl_loss(start, cross_entropy, eager)
            if start
            else losses.make_kl_loss(cross_entropy, eager)
        )
    if start:
        return prefix_cache.make_loss(start, cross_entropy, head)
    return losses.make_loss(cross_entropy, head)


def before_loading(levers: Levers) -> None:
    """What the training process sets up before it loads the model."""
    if levers.keep_freed_memory and device.on_cpu():
        from ..accel import blas  # the CPU fast path: only on the CPU (see plan_loss)

        blas.keep_freed_memory()  # this process ends with the job (worker, CLI)


def _cpu_levers(
    model: nn.Module, levers: Levers, use_head: bool
) -> tuple[TokenLoss | None, Head | None, bool, Callable[[], AbstractContextManager[Any]]]:
    """On the CPU: the cross-entropy split over the cores, the output-layer kernel (with
    `use_head`), whether steps run eagerly, and the context they run in."""
    if not (device.on_cpu() and (use_head or levers.cpu_ops)):
        return None, None, False, contextlib.nullcontext
    # Imported here: on Metal and CUDA nothing of the CPU fast path is loaded.
    from ..accel import kernels, streams

    weight = anatomy.output_weight(model) if use_head else None
    head = kernels.head(weight) if weight is not None else None
    eager = head is not None or levers.cpu_ops
    cross_entropy = functools.partial(streams.split_rows, nn.losses.cross_entropy) if levers.cpu_ops else None
    return (
        cross_entropy,
        head,
        eager,
        functools.partial(streams.parallel_training, model, ops=levers.cpu_ops, eager=eager),
    )


def _keep_cache(
    model: nn.Module,
    params: Parameters,
    lengths: list[int],
    plan: Sequence[Sequence[int]],
    val_lengths: list[int] | None,
    pad: int,
    rows: int,
    on_event: EventSink,
) -> bool:
    """Whether the frozen blocks' outputs are kept: from a second epoch on, within the budget
    (every training batch once and the validation batches; `rows` sequences per sample)."""
    if params.epochs < 2:  # one epoch: the frozen blocks still run outside the step, nothing kept
        return False
    unique = list({tuple(b): list(b) for b in plan}.values())
    cached = rows * datasets.padded_tokens(lengths, unique, pad)
    if val_lengths is not None:
        cached += rows * datasets.padded_tokens(
            val_lengths, datasets.in_order(len(val_lengths), params.batch_size), pad
        )
    if prefix_cache.fits(cached, model.args.hidden_size):
        return True
    on_event({"type": "info", "message": "the frozen blocks' outputs would not fit the cache budget; not cached"})
    return False


CHECKED = 32  # tokens past the prompt that the shortcuts' check computes


def _checked(
    chosen: LossPlan, plain: LossPlan, got: mx.array, expected: mx.array, keep: bool, on_event: EventSink
) -> LossPlan:
    """The plan with its shortcuts where their loss is the plain one's, else the plain plan; either said."""
    if not mx.allclose(got, expected, atol=1e-4, rtol=1e-4).item():
        on_event({"type": "info", "message": "this model's forward pass cannot be split; trained without shortcuts"})
        return plain
    if chosen.start and keep:
        message = f"the first {chosen.start} blocks are frozen: their outputs are computed once"
        on_event({"type": "info", "message": message})
    return chosen


def plan_preference(
    model: nn.Module,
    params: Parameters,
    pairs: preference.Pairs,
    plan: Sequence[Sequence[int]],
    levers: Levers,
    on_event: EventSink,
    val_pairs: preference.Pairs | None = None,
) -> LossPlan:
    """`plan_loss` for preference runs (tuner/preference.py): the same levers (eager steps, the
    CPU's split cross-entropy and kernels, the output-layer kernel, the frozen blocks' outputs
    cached), checked against the model's own forward pass on the first row."""
    cross_entropy, head, eager, running = _cpu_levers(model, levers, levers.cpu_head)
    pad = levers.pad_multiple or (1 if eager else datasets.PAD_MULTIPLE)
    plain = LossPlan(
        preference.make_loss(params, preference.Forward(cross_entropy=cross_entropy)),
        preference=params,
        eager=eager,
        pad_multiple=pad,
        cross_entropy=cross_entropy,
        running=running,
    )
    start = prefix_cache.frozen_blocks(model, params) if levers.prefix_cache and params.prefix_cache else 0
    val_lengths = val_pairs.lengths() if val_pairs is not None else None
    keep = bool(start) and _keep_cache(model, params, pairs.lengths(), plan, val_lengths, pad, 2, on_event)
    if not start and head is None:
        return plain
    forward = preference.Forward(start, cross_entropy, head)
    chosen = msgspec.structs.replace(plain, start=start, head=head, loss=preference.make_loss(params, forward))
    inputs, tokens, rows, reference = next(preference.batches(pairs, [plan[0][:1]], None, params.max_seq_length, pad))
    expected = plain.loss(model, inputs, tokens, rows, reference)[0]
    if start:
        chosen = msgspec.structs.replace(chosen, cache=prefix_cache.Cache(model, start, keep))
        assert chosen.cache is not None
        inputs = chosen.cache.compute(tokens)
    got = chosen.loss(model, inputs, tokens, rows, reference)[0]
    return _checked(chosen, plain, got, expected, keep, on_event)


def plan_loss(
    model: nn.Module,
    params: Parameters,
    train_set: Any,
    plan: Sequence[Sequence[int]],
    on_event: EventSink,
    levers: Levers,
    val_set: Any = None,
) -> LossPlan:
    """The fastest way to compute `masked_loss` here, checked against it on the first sample."""
    cross_entropy, head, eager, running = _cpu_levers(model, levers, levers.cpu_head)
    pad = levers.pad_multiple or (1 if eager else datasets.PAD_MULTIPLE)
    kl = params.rehearsal_loss == "kl"
    if kl and head is not None:
        on_event(
            {
                "type": "info",
                "message": 'rehearsal_loss "kl" needs whole logits: the output-layer kernel does not apply',
            }
        )
        head = None
    plain = LossPlan(
        _loss(0, cross_entropy, None, kl, eager),
        eager=eager,
        pad_multiple=pad,
        cross_entropy=cross_entropy,
        running=running,
        kl=kl,
    )
    start = prefix_cache.frozen_blocks(model, params) if levers.prefix_cache and params.prefix_cache else 0
    val_lengths = datasets.item_lengths(val_set) if val_set is not None else None
    keep = bool(start) and _keep_cache(
        model, params, datasets.item_lengths(train_set), plan, val_lengths, pad, 1, on_event
    )
    if not start and head is None:
        return plain
    # One sample is enough to catch a model these shortcuts do not fit, at a quarter of a batch's
    # cost, and its first CHECKED tokens past the prompt (a 512-token sample took 3 s, twice over).
    item = train_set[plan[0][0]]
    tokens, lengths = datasets.collate([item], min(params.max_seq_length, item[1] + CHECKED), pad)
    expected = plain.loss(model, tokens, lengths)[0]
    chosen = msgspec.structs.replace(plain, start=start, head=head, loss=_loss(start, cross_entropy, head, kl, eager))
    if start:
        cache = prefix_cache.Cache(model, start, keep)
        chosen = msgspec.structs.replace(chosen, cache=cache)
        got = chosen.loss(model, cache.compute(tokens), tokens, lengths)[0]
    else:
        got = chosen.loss(model, tokens, lengths)[0]
    return _checked(chosen, plain, got, expected, keep, on_event)


def use_bfloat16(
    model: nn.Module, params: Parameters, chosen: LossPlan, on_event: EventSink, rows: Counter[int]
) -> LossPlan:
    """The frozen weights in bfloat16 where the user asked for it, it applies, and it is faster
    for their shapes on this CPU (accel/bf16/timings.py: timed once per CPU model, at `rows`,
    {rows a step: steps}); else an event that says why not. Returns the plan to train with."""
    if not params.cpu_bfloat16:
        return chosen
    reason = None if device.on_cpu() else "off the CPU the model trains in its own dtype"
    if reason is None:
        from ..accel import bf16  # the CPU fast path, as above

        reason = bf16.unavailable() or (
            None if chosen.eager else "it needs eager steps (the cpu_head or cpu_ops lever)"
        )
    if reason:
        on_event({"type": "info", "message": f"cpu_bfloat16 does not apply ({reason}): training in float32"})
        return chosen
    timings = bf16.Timings(bf16.default_path())
    gains: list[float] = []

    def choose(products: bf16.Products) -> str:
        engine, float32, fastest = timings.choose(products, rows)
        gains.append(float32 / fastest)
        return engine

    head_weight = bf16.convert(model, anatomy.output_weight(model), on_event, choose)
    if timings.measured:
        on_event({"type": "info", "message": f"cpu_bfloat16: timed {timings.measured} matmul shapes on this CPU, once"})
    if max(gains, default=0.0) < bf16.MIN_GAIN:
        best = f"at best {max(gains):.2f}x" if gains else "none to convert"
        on_event(
            {
                "type": "info",
                "message": f"cpu_bfloat16 does not apply (no matmul of this model is {bf16.MIN_GAIN}x faster in"
                f" bfloat16 on this CPU: {best}): training in float32",
            }
        )
    if chosen.head is not None and head_weight is not None:
        from ..accel import kernels  # the CPU fast path, as above

        return chosen.with_head(kernels.head(head_weight))
    return chosen
