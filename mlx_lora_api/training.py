"""One fine-tune: load the base, add LoRA/DoRA layers (or unfreeze), train with mlx-lm's
trainer and write the adapter in mlx-lm's folder format.

mlx-lm's `train` does the stepping; this module brings what it lacks for a service: exact
epochs (datasets.make_iterate_batches), progress events through `on_event`, float32 on the
CPU, and an adapter_config.json that `mlx_lm.generate --adapter-path` reads unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from . import datasets
from .schemas import FinetuneRequest, Parameters

EventSink = Callable[[dict], None]


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
    }
    if params.fine_tune_type != "full":
        config["lora_parameters"] = {
            "rank": params.rank,
            "scale": params.lora_scale,
            "dropout": params.dropout,
        }
    return config


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


class _Reporter:
    """mlx-lm's TrainingCallback, turned into events, and the metrics kept for meta.json."""

    def __init__(self, on_event: EventSink, total: int, per_epoch: int):
        self.on_event = on_event
        self.total = total
        self.per_epoch = per_epoch
        self.metrics: dict[str, Any] = {"iterations": total}
        self.val_losses: list[float] = []

    def on_train_loss_report(self, info: dict) -> None:
        it = info["iteration"]
        self.metrics.update(final_train_loss=info["train_loss"], trained_tokens=info["trained_tokens"])
        self.on_event(
            {
                "type": "train",
                "iteration": it,
                "epoch": round(it / self.per_epoch, 4),
                "train_loss": info["train_loss"],
                "learning_rate": info["learning_rate"],
                "tokens_per_second": info["tokens_per_second"],
                "trained_tokens": info["trained_tokens"],
                "peak_memory_gb": info["peak_memory"],
            }
        )

    def on_val_loss_report(self, info: dict) -> None:
        self.val_losses.append(info["val_loss"])
        self.metrics.update(final_val_loss=info["val_loss"], best_val_loss=min(self.val_losses))
        self.on_event({"type": "val", "iteration": info["iteration"], "val_loss": info["val_loss"]})


def train_adapter(
    base_path: str,
    base_ref: str,
    request: FinetuneRequest,
    out_dir: Path,
    on_event: EventSink = lambda event: None,
) -> dict[str, Any]:
    """Train and write `adapter_config.json` and `adapters.safetensors` into `out_dir`.

    Returns the run's metrics. `out_dir` must exist; the caller stages and publishes it.
    """
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train
    from mlx_lm.utils import load

    from . import backend

    params = request.parameters
    started = time.perf_counter()
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
        val_batches=params.val_batches,
        steps_per_report=params.steps_per_report,
        steps_per_eval=params.steps_per_eval,
        steps_per_save=params.save_every,
        max_seq_length=params.max_seq_length,
        adapter_file=str(out_dir / "adapters.safetensors"),
        grad_checkpoint=params.grad_checkpoint,
        grad_accumulation_steps=params.grad_accumulation_steps,
    )
    optimizer = build_optimizer(params, max(iters // params.grad_accumulation_steps, 1))
    reporter = _Reporter(on_event, iters, per_epoch)
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
    train(
        model=model,
        optimizer=optimizer,
        train_dataset=train_set,
        val_dataset=val_set,
        args=args,
        iterate_batches=datasets.make_iterate_batches(plan, on_truncate),
        training_callback=reporter,
    )
    if val_set is not None:
        # mlx-lm's last validation runs before the last step; report the trained adapter's too.
        val_loss = evaluate(
            model, val_set, params.batch_size, params.val_batches, params.max_seq_length,
            iterate_batches=datasets.make_iterate_batches(plan),
        )
        reporter.on_val_loss_report({"iteration": iters, "val_loss": val_loss})
    _collect_checkpoints(out_dir)
    reporter.metrics.update(
        trainable_parameters=trainable, seconds=round(time.perf_counter() - started, 3), num_layers=num_layers
    )
    return reporter.metrics


def _collect_checkpoints(out_dir: Path) -> None:
    """mlx-lm writes `NNNNNNN_adapters.safetensors` beside the adapter; keep them in checkpoints/."""
    found = sorted(out_dir.glob("[0-9]*_adapters.safetensors"))
    if not found:
        return
    folder = out_dir / "checkpoints"
    folder.mkdir(exist_ok=True)
    for path in found:
        path.rename(folder / path.name)
