"""The optimizer and its learning-rate schedule, from the run's parameters."""

from __future__ import annotations

from collections.abc import Callable

import mlx.optimizers as optim

from ..types import Parameters

Schedule = Callable[[int], float]


def build_schedule(params: Parameters, updates: int) -> float | Schedule:
    lr = params.concrete()[0]
    warmup = min(params.warmup_steps, updates)
    main: Schedule
    if params.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, max(updates - warmup, 1), params.min_learning_rate)
    elif warmup:
        main = lambda step: lr
    else:
        return lr
    if not warmup:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), main], [warmup])


def build_optimizer(params: Parameters, updates: int) -> optim.Optimizer:
    lr = build_schedule(params, updates)
    if params.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    if params.optimizer == "adamw":
        return optim.AdamW(
            learning_rate=lr, weight_decay=params.weight_decay if params.weight_decay is not None else 0.01
        )
    if params.optimizer == "sgd":
        return optim.SGD(learning_rate=lr, weight_decay=params.weight_decay or 0.0)
    return optim.Adafactor(learning_rate=lr)
