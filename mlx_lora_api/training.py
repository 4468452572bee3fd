"""One fine-tune: load the base, add LoRA/DoRA layers (or unfreeze), train with mlx-lm's
trainer and write the adapter in mlx-lm's folder format.

mlx-lm's `train` does the stepping; this module brings what it lacks for a service: exact
epochs (datasets.make_iterate_batches), progress events through `on_event`, float32 on the
CPU, and an adapter_config.json that `mlx_lm.generate --adapter-path` reads unchanged.
`plan_loss` picks the speed-ups (`Levers`) that apply, each exact: the frozen blocks' outputs
cached (`prefix_cache`) and, on the CPU, numpy for the softmaxes and sigmoids (`cpu_kernels`,
with eager steps) and glibc keeping freed memory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import msgspec

from . import datasets
from .cpu_parallel import parallel_training
from .losses import cpu_head_loss, masked_loss
from .schemas import FinetuneRequest, Parameters

EventSink = Callable[[dict], None]
BEST_FILE = "best_adapters.safetensors"


def lora_num_layers(params: Parameters, model_layers: int) -> int:
    if params.num_layers is None:
        return min(16, model_layers)
    if params.num_layers == -1:
        return model_layers
    if params.num_layers > model_layers:
        raise ValueError(
            f"`parameters.num_layers` is {params.num_layers} but the base model has {model_layers} layers"
        )
    return params.num_layers


def adapter_config(params: Parameters, base_ref: str, num_layers: int, iters: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model": base_ref,
        "fine_tune_type": params.fine_tune_type,
        "num_layers": num_layers,
        "batch_size": params.batch_size,
        "iters": iters,
        "epochs": params.epochs,
        "learning_rate": params.learning_rate,
        "lr_schedule": params.lr_schedule,
        "warmup_steps": params.warmup_steps,
        "optimizer": params.optimizer,
        "max_seq_length": params.max_seq_length,
        "mask_prompt": params.mask_prompt,
        "grad_checkpoint": params.grad_checkpoint,
        "grad_accumulation_steps": params.grad_accumulation_steps,
        "seed": params.seed,
        "cpu_bfloat16": params.cpu_bfloat16,
    }
    if params.fine_tune_type != "full":
        config["lora_parameters"] = {
            "rank": params.rank,
            "scale": params.lora_scale,
            "dropout": params.dropout,
        }
    return config


class Levers(msgspec.Struct, frozen=True):
    """The training speed-ups, each exact (tests train with and without and compare the
    adapters); all on by default. All off, a step computes what mlx-lm's trainer computes, as
    mlx-lm does it (scripts/bench_train.py's `service_plain` engine)."""

    # Batches are padded to a multiple of this, plus one (mlx-lm: 32). None: 1 with eager steps,
    # which cost nothing per new shape (chat 3 epochs 343 -> 420 tok/s), else datasets.PAD_MULTIPLE
    # (each new shape retraces a compiled step).
    pad_multiple: int | None = None
    prefix_cache: bool = True  # cache the frozen blocks' outputs (also needs params.prefix_cache)
    cpu_head: bool = True  # the output layer's softmax in numpy (CPU only; cpu_kernels)
    cpu_ops: bool = True  # attention's and SwiGLU's in numpy, eager steps; MLX's cross-entropy over the cores
    keep_freed_memory: bool = True  # glibc keeps freed memory (CPU only; backend.keep_freed_memory)


PLAIN = Levers(pad_multiple=32, prefix_cache=False, cpu_head=False, cpu_ops=False, keep_freed_memory=False)


class LossPlan(msgspec.Struct):
    """How the steps compute the loss: `loss(model, *batch)` on the batches that
    `make_iterate_batches(..., prefix_cache=cache)` yields, compiled (as mlx-lm does) or not."""

    loss: Callable
    cache: Any = None
    eager: bool = False
    pad_multiple: int = datasets.PAD_MULTIPLE


def plan_loss(model, params: Parameters, train_set, plan, on_event: EventSink, levers: Levers) -> LossPlan:
    """The fastest way to compute `masked_loss` here, checked against it on the first sample."""
    from . import backend, cpu_kernels, prefix_cache

    on_cpu = backend.on_cpu()
    head = levers.cpu_head and on_cpu and cpu_kernels.output_weight(model) is not None
    eager = on_cpu and (head or levers.cpu_ops)
    pad = levers.pad_multiple or (1 if eager else datasets.PAD_MULTIPLE)
    plain = LossPlan(masked_loss, eager=eager, pad_multiple=pad)
    start = prefix_cache.frozen_blocks(model, params) if levers.prefix_cache and params.prefix_cache else 0
    keep = params.epochs >= 2  # one epoch: the frozen blocks still run outside the step, nothing kept
    if start and keep:
        lengths = datasets.item_lengths(train_set)
        unique = {tuple(b): b for b in plan}.values()
        if not prefix_cache.fits(datasets.padded_tokens(lengths, list(unique), pad), model.args.hidden_size):
            on_event({"type": "info", "message": "the frozen blocks' outputs would not fit the cache budget; not cached"})
            keep = False
    if not start and not head:
        return plain
    # One sample is enough to catch a model these shortcuts do not fit, at a quarter of a batch's cost.
    tokens, lengths = datasets.collate([train_set[plan[0][0]]], params.max_seq_length, pad)
    expected = masked_loss(model, tokens, lengths)[0]
    if start:
        cache = prefix_cache.Cache(model, start, keep)
        chosen = LossPlan(prefix_cache.make_loss(start, head), cache, eager=eager, pad_multiple=pad)
        got = chosen.loss(model, cache.compute(tokens), tokens, lengths)[0]
    else:
        chosen = LossPlan(cpu_head_loss, eager=eager, pad_multiple=pad)
        got = cpu_head_loss(model, tokens, lengths)[0]
    if not mx_close(got, expected):
        on_event({"type": "info", "message": "this model's forward pass cannot be split; trained without shortcuts"})
        return plain
    if start and keep:
        on_event({"type": "info", "message": f"the first {start} blocks are frozen: their outputs are computed once"})
    return chosen


def use_bfloat16(model, params: Parameters, chosen: LossPlan, on_event: EventSink) -> None:
    """bf16.convert where the user asked for it and it applies; else an event that says why not."""
    from . import bf16

    if not params.cpu_bfloat16:
        return
    reason = bf16.unavailable() or (None if chosen.eager else "it needs eager steps (the cpu_head or cpu_ops lever)")
    reason = reason or bf16.slower()
    if reason:
        on_event({"type": "info", "message": f"cpu_bfloat16 does not apply ({reason}): training in float32"})
    else:
        bf16.convert(model, on_event)


def mx_close(a, b) -> bool:
    import mlx.core as mx

    return mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()


def build_schedule(params: Parameters, updates: int):
    import mlx.optimizers as optim

    lr = params.learning_rate
    warmup = min(params.warmup_steps, updates)
    if params.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, max(updates - warmup, 1), params.min_learning_rate)
    elif warmup:
        main = lambda step: lr  # noqa: E731
    else:
        return lr
    if not warmup:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), main], [warmup])


def build_optimizer(params: Parameters, updates: int):
    import mlx.optimizers as optim

    lr = build_schedule(params, updates)
    if params.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    if params.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=params.weight_decay if params.weight_decay is not None else 0.01)
    if params.optimizer == "sgd":
        return optim.SGD(learning_rate=lr, weight_decay=params.weight_decay or 0.0)
    return optim.Adafactor(learning_rate=lr)


def prepare_model(model, params: Parameters, num_layers: int) -> int:
    """Freeze the model and make the chosen layers trainable; returns the trainable count."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    if params.fine_tune_type == "full":
        for layer in model.layers[-num_layers:] if num_layers else []:
            layer.unfreeze()
    else:
        lora = {"rank": params.rank, "scale": params.lora_scale, "dropout": params.dropout}
        linear_to_lora_layers(model, num_layers, lora, use_dora=params.fine_tune_type == "dora")
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


class Checkpoint(msgspec.Struct):
    iteration: int
    trained_tokens: int
    metrics: dict[str, Any]
    adapters: Path
    state: Path


def reseed(seed: int, iteration: int) -> None:
    """Random state is set afresh at each checkpoint, so a resumed run draws what an
    uninterrupted one would have (dropout masks) without saving MLX's generator state."""
    import mlx.core as mx

    mx.random.seed((seed * 1_000_003 + iteration) % 2**32)


def _save_atomically(path: Path, arrays: dict, metadata: dict | None = None) -> None:
    import mlx.core as mx

    partial = path.with_name(f".partial-{path.name}")
    mx.save_safetensors(str(partial), arrays, metadata)
    os.replace(partial, path)


def save_checkpoint(out_dir: Path, iteration: int, model, optimizer, trained_tokens: int, metrics: dict) -> Path:
    """Adapter weights (mlx-lm's format) and the optimizer's state with the step it belongs to.
    The state file is written last: a checkpoint counts once both are there."""
    from mlx.utils import tree_flatten

    folder = out_dir / "checkpoints"
    folder.mkdir(exist_ok=True)
    adapters = folder / f"{iteration:07d}_adapters.safetensors"
    _save_atomically(adapters, dict(tree_flatten(model.trainable_parameters())))
    metadata = {"iteration": str(iteration), "trained_tokens": str(trained_tokens), "metrics": json.dumps(metrics)}
    _save_atomically(folder / f"{iteration:07d}_state.safetensors", dict(tree_flatten(optimizer.state)), metadata)
    return adapters


def latest_checkpoint(out_dir: Path) -> Checkpoint | None:
    import mlx.core as mx

    for state in sorted((out_dir / "checkpoints").glob("[0-9]*_state.safetensors"), reverse=True):
        adapters = state.with_name(state.name.replace("_state", "_adapters"))
        if not adapters.exists():
            continue
        try:
            _, metadata = mx.load(str(state), return_metadata=True)
        except (RuntimeError, ValueError, OSError):
            continue  # a damaged file: fall back to the one before
        return Checkpoint(
            int(metadata["iteration"]), int(metadata["trained_tokens"]), json.loads(metadata.get("metrics", "{}")),
            adapters, state,
        )
    return None


def restore(checkpoint: Checkpoint, model, optimizer) -> None:
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    model.load_weights(str(checkpoint.adapters), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(checkpoint.state)).items()))
    optimizer.init(model.trainable_parameters())


class _StepHook:
    """Called by mlx-lm's trainer after every step (steps_per_report=1): reports progress at the
    user's interval, validates, saves checkpoints and keeps the best adapter.

    Validation and checkpoints run here rather than in mlx-lm because its validation runs before
    a step and its checkpoints after one, so their numbers never describe the same weights.
    """

    def __init__(self, model, optimizer, params: Parameters, out_dir: Path, on_event: EventSink, total: int,
                 per_epoch: int, validate: Callable[[], float] | None, start: Checkpoint | None = None):
        self.model = model
        self.optimizer = optimizer
        # A resumed run counts on from its checkpoint: mlx-lm's trainer numbers from 1 again.
        self.offset = start.iteration if start else 0
        self.tokens_before = start.trained_tokens if start else 0
        self.params = params
        self.out_dir = out_dir
        self.on_event = on_event
        self.total = total
        self.per_epoch = per_epoch
        self.validate = validate
        self.metrics: dict[str, Any] = {"iterations": total, **(start.metrics if start else {})}
        self.best: tuple[float, int] | None = (
            (self.metrics["best_val_loss"], self.metrics["best_iteration"]) if "best_val_loss" in self.metrics else None
        )
        self._window: list[tuple[float, float, float]] = []  # (loss, tokens, seconds) of each step
        self._tokens = self.tokens_before  # trained tokens at the last step seen

    def _save(self, path: Path) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        mx.save_safetensors(str(path), dict(tree_flatten(self.model.trainable_parameters())))

    def evaluate(self, iteration: int) -> float | None:
        if self.validate is None:
            return None
        loss = self.validate()
        self.metrics["final_val_loss"] = loss
        if self.best is None or loss < self.best[0]:
            self.best = (loss, iteration)
            self.metrics.update(best_val_loss=loss, best_iteration=iteration)
            if self.params.keep == "best":
                self._save(self.out_dir / BEST_FILE)
        self.on_event({"type": "val", "iteration": iteration, "val_loss": loss})
        return loss

    def on_val_loss_report(self, info: dict) -> None:
        pass  # mlx-lm's own validation is off; see evaluate()

    def on_train_loss_report(self, info: dict) -> None:
        info = {**info, "iteration": info["iteration"] + self.offset,
                "trained_tokens": info["trained_tokens"] + self.tokens_before}
        it = info["iteration"]
        tokens = info["trained_tokens"] - self._tokens
        self._tokens = info["trained_tokens"]
        self._window.append((info["train_loss"], tokens, tokens / max(info["tokens_per_second"], 1e-9)))
        if it % self.params.steps_per_report == 0 or it == self.total:
            self._report(it, info)
        val_loss = None
        if it % self.params.steps_per_eval == 0 or it == self.total:
            val_loss = self.evaluate(it)
        if it % self.params.save_every == 0 and it != self.total:
            reseed(self.params.seed, it)
            path = save_checkpoint(self.out_dir, it, self.model, self.optimizer, self._tokens, self.metrics)
            self.on_event({"type": "checkpoint", "iteration": it, "val_loss": val_loss, "file": f"checkpoints/{path.name}"})

    def _report(self, it: int, info: dict) -> None:
        losses, tokens, seconds = zip(*self._window)
        self._window = []
        loss = sum(losses) / len(losses)
        self.metrics.update(final_train_loss=loss, trained_tokens=info["trained_tokens"])
        self.on_event(
            {
                "type": "train",
                "iteration": it,
                "epoch": round(it / self.per_epoch, 4),
                "train_loss": loss,
                "learning_rate": info["learning_rate"],
                "tokens_per_second": sum(tokens) / max(sum(seconds), 1e-9),
                "trained_tokens": info["trained_tokens"],
                "peak_memory_gb": info["peak_memory"],
            }
        )

    def finish(self) -> None:
        """With keep=best, the published adapter is the one of the lowest validation loss."""
        best_file = self.out_dir / BEST_FILE
        if self.params.keep == "best" and best_file.exists():
            best_file.replace(self.out_dir / "adapters.safetensors")
            self.metrics["kept"] = f"best (iteration {self.best[1]})"
        else:
            self.metrics["kept"] = "last"


def train_adapter(
    base_path: str,
    base_ref: str,
    request: FinetuneRequest,
    out_dir: Path,
    on_event: EventSink = lambda event: None,
    resume: bool = False,
    levers: Levers = Levers(),
) -> dict[str, Any]:
    """Train and write `adapter_config.json` and `adapters.safetensors` into `out_dir`.

    Returns the run's metrics. `out_dir` must exist; the caller stages and publishes it.
    With `resume`, training goes on from the latest checkpoint in `out_dir`: weights,
    optimizer state, step, learning-rate schedule and data order, so the result matches
    an uninterrupted run.
    """
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train
    from mlx_lm.utils import load

    from . import backend

    params = request.parameters
    started = time.perf_counter()
    if levers.keep_freed_memory and backend.on_cpu():
        backend.keep_freed_memory()  # this process ends with the job (worker, CLI)
    on_event({"type": "loading", "base_model": base_ref})
    model, tokenizer = load(base_path)
    backend.cast_for_compute(model)
    mx.random.seed(params.seed)
    np.random.seed(params.seed)

    num_layers = lora_num_layers(params, len(model.layers))
    trainable = prepare_model(model, params, num_layers)

    train_set = datasets.build(request.training_data, tokenizer, params.mask_prompt)
    val_set = datasets.build(request.validation_data, tokenizer, params.mask_prompt) if request.validation_data else None
    plan = datasets.epoch_plan(datasets.item_lengths(train_set), params.batch_size, params.epochs, params.seed)
    per_epoch = datasets.batches_per_epoch(len(train_set), params.batch_size)
    iters = len(plan)

    def on_truncate(longest: int) -> None:
        on_event(
            {
                "type": "warning",
                "message": f"a sample of {longest} tokens is longer than max_seq_length={params.max_seq_length}"
                " and was truncated",
            }
        )

    config = adapter_config(params, base_ref, num_layers, iters)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    args = TrainingArgs(
        batch_size=params.batch_size,
        iters=iters,
        steps_per_report=1,  # every step reaches the hook, which reports at the user's interval
        steps_per_save=iters + 1,  # the hook saves checkpoints; mlx-lm writes only the final adapter
        max_seq_length=params.max_seq_length,
        adapter_file=str(out_dir / "adapters.safetensors"),
        grad_checkpoint=params.grad_checkpoint,
        grad_accumulation_steps=params.grad_accumulation_steps,
    )

    chosen = plan_loss(model, params, train_set, plan, on_event, levers)

    def validate() -> float:
        loss = evaluate(
            model, val_set, params.batch_size, params.val_batches, params.max_seq_length,
            loss=chosen.loss,
            iterate_batches=datasets.make_iterate_batches(
                plan, prefix_cache=chosen.cache, pad_multiple=chosen.pad_multiple
            ),
        )
        model.train()
        return loss

    optimizer = build_optimizer(params, max(iters // params.grad_accumulation_steps, 1))
    start = latest_checkpoint(out_dir) if resume else None
    if start is not None:
        restore(start, model, optimizer)
        reseed(params.seed, start.iteration)
        on_event({"type": "resumed", "iteration": start.iteration})
    done = start.iteration if start else 0
    args.iters = iters - done
    hook = _StepHook(model, optimizer, params, out_dir, on_event, iters, per_epoch,
                     validate if val_set is not None else None, start)
    on_event(
        {
            "type": "started",
            "total_iterations": iters,
            "epochs": params.epochs,
            "samples": len(train_set),
            "trainable_parameters": trainable,
            "num_layers": num_layers,
        }
    )
    use_bfloat16(model, params, chosen, on_event)
    with parallel_training(model, ops=levers.cpu_ops, eager=chosen.eager):
        if start is None:
            hook.evaluate(0)
        if args.iters > 0:
            train(
                model=model,
                optimizer=optimizer,
                train_dataset=train_set,
                val_dataset=None,
                args=args,
                loss=chosen.loss,
                iterate_batches=datasets.make_iterate_batches(
                    plan[done:], on_truncate, prefix_cache=chosen.cache, pad_multiple=chosen.pad_multiple
                ),
                training_callback=hook,
            )
    hook.finish()
    hook.metrics.update(
        trainable_parameters=trainable, seconds=round(time.perf_counter() - started, 3), num_layers=num_layers
    )
    return hook.metrics
