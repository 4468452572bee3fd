"""Fine-tune: load the base, add LoRA/DoRA layers (or unfreeze), train with mlx-lm's trainer and
write the adapter in mlx-lm's folder format.

mlx-lm's `train` does the stepping; this module brings what it lacks for a service: exact
epochs (tuner/datasets.py), progress events through `on_event` (tuner/callbacks.py), exact
resume (tuner/checkpoints.py), float32 on the CPU, and an adapter_config.json that
`mlx_lm.generate --adapter-path` reads unchanged. tuner/levers.py picks the speed-ups that
apply, each exact.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from .. import device
from ..tuner import checkpoints, datasets, distributed, preference, retention
from ..tuner import levers as lever_switches
from ..tuner.callbacks import StepHook, StopTraining
from ..tuner.levers import Levers
from ..tuner.optimizers import build_optimizer
from ..types import FinetuneRequest, Parameters, Sample

EventSink = Callable[[dict[str, Any]], None]


def lora_num_layers(params: Parameters, model_layers: int) -> int:
    if params.num_layers is None:
        return min(16, model_layers)
    if params.num_layers == -1:
        return model_layers
    if params.num_layers > model_layers:
        raise ValueError(f"`parameters.num_layers` is {params.num_layers} but the base model has {model_layers} layers")
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
    if params.method != "sft":
        config["method"] = params.method
        config["beta" if params.method == "dpo" else "orpo_lambda"] = (
            params.dpo_beta if params.method == "dpo" else params.orpo_weight
        )
    if params.fine_tune_type != "full":
        config["lora_parameters"] = {
            "rank": params.rank,
            "scale": params.lora_scale,
            "dropout": params.dropout,
        }
    return config


def prepare_model(model: nn.Module, params: Parameters, num_layers: int) -> int:
    """Freeze the model and make the chosen layers trainable; returns the trainable count."""
    model.freeze()
    if params.fine_tune_type == "full":
        for layer in model.layers[-num_layers:] if num_layers else []:
            layer.unfreeze()
    else:
        lora = {"rank": params.rank, "scale": params.lora_scale, "dropout": params.dropout}
        linear_to_lora_layers(model, num_layers, lora, use_dora=params.fine_tune_type == "dora")
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def load_initial_weights(model: nn.Module, path: Path) -> None:
    """An existing adapter's weights into the fresh LoRA layers; every trainable tensor must be there."""
    weights: dict[str, mx.array] = dict(mx.load(str(path)))  # a .safetensors file: a dict
    trainable = dict(tree_flatten(model.trainable_parameters()))
    missing = sorted(set(trainable) - set(weights))
    if missing or any(weights[k].shape != v.shape for k, v in trainable.items()):
        raise ValueError(f"the adapter in {path} does not fit these LoRA layers (missing: {missing[:3]})")
    model.load_weights([(k, weights[k]) for k in trainable], strict=False)
    device.cast_for_compute(model)


def train_adapter(
    base_path: str,
    base_ref: str,
    request: FinetuneRequest,
    out_dir: Path,
    on_event: EventSink = lambda event: None,
    resume: bool = False,
    levers: Levers | None = None,
    retention_cache: Path | None = None,
    initial_weights: Path | None = None,
    group: Any = None,
    checkpoints_from: Path | None = None,
) -> dict[str, Any]:
    """Train and write `adapter_config.json` and `adapters.safetensors` into `out_dir`.

    Returns the run's metrics. `out_dir` must exist; the caller stages and publishes it.
    With `resume`, training goes on from the latest checkpoint in `out_dir`: weights,
    optimizer state, step, learning-rate schedule and data order, so the result matches
    an uninterrupted run. `levers`: the speed-ups it may use (default: as MLX_LORA_API_LEVERS says).
    `retention_cache`: where each base's answers to the retention prompts are kept (None: not kept).
    `initial_weights`: an adapter's weights to start from (`resume_from`) rather than fresh LoRA layers.
    `group`: MLX's distributed group of a data-parallel run (jobs/rank.py; tuner/distributed.py):
    this rank trains on its share of every batch. `checkpoints_from`: where `resume` finds the
    checkpoints, where it is not `out_dir` (a rank but the first writes into a folder of its own).
    """
    levers = levers or lever_switches.from_environment()
    params = request.parameters
    started = time.perf_counter()
    lever_switches.before_loading(levers)
    on_event({"type": "loading", "base_model": base_ref})
    model, tokenizer = load(base_path)
    device.cast_for_compute(model)
    mx.random.seed(params.seed)
    np.random.seed(params.seed)

    num_layers = lora_num_layers(params, len(model.layers))
    trainable = prepare_model(model, params, num_layers)

    # Before any checkpoint is restored: the model with fresh LoRA layers is still its base.
    # Rehearsal is SFT's: a preference run is held to the base by its reference (DPO) or not at all (ORPO).
    preferring = params.method != "sft"
    rehearsing = params.rehearsal > 0 and not preferring
    wanted = params.retention_check or rehearsing
    ref = retention.reference(model, tokenizer, base_path, retention_cache, on_event) if wanted else None
    rehearsed = 0
    train_set: Any
    val_set: Any
    if preferring:  # FinetuneRequest checked that every sample is a preference row
        train_set = preference.Pairs([s for s in request.training_data if isinstance(s, Sample)], tokenizer)
        val_rows = [s for s in request.validation_data or [] if isinstance(s, Sample)]
        val_set = preference.Pairs(val_rows, tokenizer) if val_rows else None
        lengths = train_set.lengths()
    else:
        train_set = datasets.build(request.training_data, tokenizer, params.mask_prompt)
        if ref is not None and rehearsing:
            count = math.ceil(params.rehearsal * len(request.training_data))
            rehearsal = retention.rehearsal_samples(ref, count)
            rehearsal_set = datasets.build(rehearsal, tokenizer, mask_prompt=True)
            train_set = datasets.Joined(train_set, rehearsal_set, mark_second=params.rehearsal_loss == "kl")
            rehearsed = len(rehearsal)
        val_set = (
            datasets.build(request.validation_data, tokenizer, params.mask_prompt) if request.validation_data else None
        )
        lengths = datasets.item_lengths(train_set)
    own = len(request.training_data)
    plan = datasets.epoch_plan(lengths, params.batch_size, params.epochs, params.seed, own if rehearsed else None)
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

    if preferring:
        chosen = lever_switches.plan_preference(model, params, train_set, plan, levers, on_event, val_set)
    else:
        chosen = lever_switches.plan_loss(model, params, train_set, plan, on_event, levers, val_set)
    size = group.size() if group is not None else 1
    rows = datasets.step_rows(lengths, plan, params.max_seq_length, chosen.pad_multiple, 2 if preferring else 1, size)
    chosen = lever_switches.use_bfloat16(model, params, chosen, on_event, rows)
    references: dict[str, Any] = {"train": None, "val": None}  # DPO's, computed below
    evaluating = chosen.evaluating()

    def validate() -> tuple[float, dict[str, float]]:
        if preferring:
            return preference.evaluate(
                model,
                val_set,
                evaluating.loss,
                references["val"],
                params.batch_size,
                params.val_batches,
                params.max_seq_length,
                chosen.pad_multiple,
                chosen.cache,
            )
        loss = evaluate(
            model,
            val_set,
            params.batch_size,
            params.val_batches,
            params.max_seq_length,
            loss=evaluating.loss,
            iterate_batches=datasets.make_iterate_batches(
                plan, prefix_cache=chosen.cache, pad_multiple=chosen.pad_multiple
            ),
        )
        model.train()
        return loss, {}

    optimizer = build_optimizer(params, max(iters // params.grad_accumulation_steps, 1))
    start = checkpoints.latest(checkpoints_from or out_dir) if resume else None
    if initial_weights is not None:  # after the base's answers: they need the base
        load_initial_weights(model, initial_weights)
        if start is None:
            on_event({"type": "info", "message": f"starting from the weights of {request.resume_from}"})
    if params.method == "dpo":  # the model as training starts, before a checkpoint is restored
        with chosen.running():
            references.update(dpo_references(model, train_set, val_set, params, chosen, on_event))
    if start is not None:
        checkpoints.restore(start, model, optimizer)
        checkpoints.reseed(params.seed, start.iteration)
        on_event({"type": "resumed", "iteration": start.iteration})
    done = start.iteration if start else 0
    args.iters = iters - done

    def retain() -> dict[str, Any]:
        assert ref is not None
        return retention.measure(model, tokenizer, ref, params.retention_threshold, name_changes=False)

    hook = StepHook(
        model,
        optimizer,
        params,
        out_dir,
        on_event,
        iters,
        per_epoch,
        validate if val_set is not None else None,
        start,
        retain if ref is not None and params.retention_stop else None,
    )
    on_event(
        {
            "type": "started",
            "total_iterations": iters,
            "epochs": params.epochs,
            "samples": len(train_set),
            "rehearsal_samples": rehearsed,
            "trainable_parameters": trainable,
            "num_layers": num_layers,
            # The job's progress says how many ranks ran (a resume may run on fewer): one rank has
            # no backend or hosts, and these nulls clear a previous run's.
            "ranks": group.size() if group is not None else 1,
            **({} if group is not None and group.size() > 1 else {"backend": None, "hosts": None}),
        }
    )
    # A data-parallel rank: its share of each batch, its loss weighted (tuner/distributed.py).
    size = group.size() if group is not None else 1
    todo, weights = plan[done:], [1.0] * (iters - done)
    step_loss = chosen.loss
    if size > 1:
        todo, weights = distributed.shares(todo, group.rank(), size)
        step_loss = distributed.weighted(chosen.loss, size, pairs=preferring)
    with chosen.running():
        if start is None:
            hook.evaluate(0)
        if args.iters > 0:
            try:
                if preferring:
                    steps = preference.batches(
                        train_set,
                        todo,
                        references["train"],
                        params.max_seq_length,
                        chosen.pad_multiple,
                        on_truncate,
                        chosen.cache,
                    )
                    if size > 1:
                        steps = distributed.with_weights(steps, weights)
                    preference.train(
                        model,
                        optimizer,
                        step_loss,
                        steps,
                        args.iters,
                        args.adapter_file,
                        params,
                        hook.on_train_loss_report,
                    )
                else:
                    train(
                        model=model,
                        optimizer=optimizer,
                        train_dataset=train_set,
                        val_dataset=None,
                        args=args,
                        loss=step_loss,
                        iterate_batches=datasets.make_iterate_batches(
                            todo,
                            on_truncate,
                            prefix_cache=chosen.cache,
                            pad_multiple=chosen.pad_multiple,
                            weights=weights if size > 1 else None,
                        ),
                        training_callback=hook,
                    )
            except StopTraining as stop:
                on_event({"type": "info", "message": str(stop)})
    hook.finish()
    # After training, rank 0 alone: only it wrote the adapter as published, and this needs no other rank.
    if ref is not None and params.retention_check and (group is None or group.rank() == 0):
        hook.metrics["retention"] = check_retention(model, tokenizer, ref, out_dir, params, on_event)
    hook.metrics.update(
        device="cpu" if device.on_cpu() else "gpu",
        trainable_parameters=trainable,
        seconds=round(time.perf_counter() - started, 3),
        num_layers=num_layers,
        rehearsal_samples=rehearsed,
    )
    return hook.metrics


def dpo_references(model, train_set, val_set, params: Parameters, chosen, on_event: EventSink) -> dict:
    """DPO's reference log-probs of every answer, train and validation, in one pass before training
    (through the run's own forward pass: `chosen`, its LossPlan)."""
    started = time.perf_counter()
    chosen = chosen.evaluating()
    forward = preference.Forward(chosen.start, chosen.cross_entropy, chosen.head)
    found = {
        name: preference.reference_logps(
            model, pairs, params.batch_size, params.max_seq_length, chosen.pad_multiple, forward, chosen.cache
        )
        for name, pairs in (("train", train_set), ("val", val_set))
        if pairs is not None
    }
    seconds = time.perf_counter() - started
    on_event({"type": "info", "message": f"DPO's reference log-probs: {len(train_set)} rows in {seconds:.1f} s"})
    return found


def check_retention(model, tokenizer, ref, out_dir: Path, params: Parameters, on_event: EventSink) -> dict[str, Any]:
    """The retention of the adapter as published (with keep=best, not the last weights), as an
    event, and a warning naming the answers that changed when it is below the threshold."""
    model.load_weights(str(out_dir / "adapters.safetensors"), strict=False)
    result = retention.measure(model, tokenizer, ref, params.retention_threshold)
    on_event(
        {
            "type": "retention",
            "retention": result["score"],
            "retention_answers_kept": result["kept"],
            "probes": result["probes"],
        }
    )
    if "changed" in result:
        changes = "; ".join(f"{c['prompt']!r}: {c['before']!r} -> {c['after']!r}" for c in result["changed"])
        on_event(
            {
                "type": "warning",
                "message": f"retention {result['score']:.2f} is below {params.retention_threshold}: the model finds"
                f" the base's own answers to general prompts much less likely, and gives {result['kept']} of"
                f" {result['probes']} of them unchanged; it may have forgotten what it knew. Changed: {changes}."
                " Lower the learning rate or the epochs, or raise `parameters.rehearsal`.",
            }
        )
    return result
