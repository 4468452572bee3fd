"""What happens after every training step: progress at the user's interval, validation,
checkpoints, and the best adapter kept (mlx-lm's `TrainingCallback` protocol)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..types import Parameters
from . import checkpoints

EventSink = Callable[[dict[str, Any]], None]
BEST_FILE = "best_adapters.safetensors"
RETAINED_FILE = "retained_adapters.safetensors"  # the last evaluated adapter whose retention passed


class StopTraining(Exception):
    """Raised from a step to end training early; `message` says why."""


class StepHook:
    """Called by mlx-lm's trainer after every step (steps_per_report=1): reports progress at the
    user's interval, validates, saves checkpoints and keeps the best adapter.

    Validation and checkpoints run here rather than in mlx-lm because its validation runs before
    a step and its checkpoints after one, so their numbers never describe the same weights.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer,
        params: Parameters,
        out_dir: Path,
        on_event: EventSink,
        total: int,
        per_epoch: int,
        validate: Callable[[], tuple[float, dict[str, float]]] | None,
        start: checkpoints.Saved | None = None,
        retain: Callable[[], dict[str, Any]] | None = None,
    ):
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
        self.retain = retain  # with retention_stop: measures retention (tuner/retention.py)
        self.stopped: str | None = None
        self.stopped_by: str | None = None  # "retention" or "patience"
        self.metrics: dict[str, Any] = {"iterations": total, **(start.metrics if start else {})}
        self.best: tuple[float, int] | None = (
            (self.metrics["best_val_loss"], self.metrics["best_iteration"]) if "best_val_loss" in self.metrics else None
        )
        self._window: list[tuple[float, float, float]] = []  # (loss, tokens, seconds) of each step
        self._extra: list[dict[str, float]] = []  # each step's other metrics (preference runs)
        self._tokens = self.tokens_before  # trained tokens at the last step seen

    def _save(self, path: Path) -> None:
        mx.save_safetensors(str(path), dict(tree_flatten(self.model.trainable_parameters())))

    def evaluate(self, iteration: int) -> float | None:
        if self.validate is None:
            return None
        loss, extra = self.validate()
        self.metrics["final_val_loss"] = loss
        self.metrics.update({f"final_val_{k}": v for k, v in extra.items()})
        if self.best is None or loss < self.best[0]:
            self.best = (loss, iteration)
            self.metrics.update(best_val_loss=loss, best_iteration=iteration)
            if self.params.keep == "best":
                self._save(self.out_dir / BEST_FILE)
        self.on_event(
            {"type": "val", "iteration": iteration, "val_loss": loss, **{f"val_{k}": v for k, v in extra.items()}}
        )
        self._patience(iteration, loss)
        return loss

    def _patience(self, iteration: int, loss: float) -> None:
        """Early stopping: count the evaluations since the validation loss last fell by more than
        min_delta (kept in the metrics, so a resumed run counts on), and stop at the patience."""
        patience = self.params.early_stopping_patience
        if patience is None:
            return
        low = self.metrics.get("early_stopping_low")
        if low is None or loss < low - self.params.early_stopping_min_delta:
            self.metrics.update(early_stopping_low=loss, early_stopping_waited=0)
            return
        self.metrics["early_stopping_waited"] += 1
        if self.metrics["early_stopping_waited"] >= patience and iteration < self.total:
            self.stopped = (
                f"stopped early at iteration {iteration}: the validation loss has not fallen by more than"
                f" {self.params.early_stopping_min_delta} in {patience} evaluations"
            )
            self.stopped_by = "patience"
            raise StopTraining(self.stopped)

    def check_retention(self, iteration: int) -> None:
        """With retention_stop: measure, keep the adapter while it passes, stop when it does not."""
        if self.retain is None or iteration == 0:
            return
        result = self.retain()
        self.on_event(
            {
                "type": "retention",
                "iteration": iteration,
                "retention": result["score"],
                "retention_answers_kept": result["kept"],
                "probes": result["probes"],
            }
        )
        if result["score"] >= self.params.retention_threshold:
            self._save(self.out_dir / RETAINED_FILE)
            self.metrics["retained_iteration"] = iteration
            return
        self.stopped = (
            f"stopped early at iteration {iteration}: retention {result['score']:.2f} fell below"
            f" {self.params.retention_threshold}"
        )
        self.stopped_by = "retention"
        raise StopTraining(self.stopped)

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        pass  # mlx-lm's own validation is off; see evaluate()

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        info = {
            **info,
            "iteration": info["iteration"] + self.offset,
            "trained_tokens": info["trained_tokens"] + self.tokens_before,
        }
        it = info["iteration"]
        tokens = info["trained_tokens"] - self._tokens
        self._tokens = info["trained_tokens"]
        seconds = tokens / max(info["tokens_per_second"], 1e-9)
        self._window.append((info["train_loss"], tokens, seconds))
        # The steps' own time (no validation, checkpoints or loading): what jobs/estimate.py calibrates on.
        self.metrics["train_seconds"] = self.metrics.get("train_seconds", 0.0) + seconds
        if "metrics" in info:
            self._extra.append(info["metrics"])
        if it % self.params.steps_per_report == 0 or it == self.total:
            self._report(it, info)
        val_loss = None
        if it % self.params.steps_per_eval == 0 or it == self.total:
            val_loss = self.evaluate(it)
            self.check_retention(it)
        if it % self.params.save_every == 0 and it != self.total:
            checkpoints.reseed(self.params.seed, it)
            path = checkpoints.save(self.out_dir, it, self.model, self.optimizer, self._tokens, self.metrics)
            self.on_event(
                {"type": "checkpoint", "iteration": it, "val_loss": val_loss, "file": f"checkpoints/{path.name}"}
            )

    def _report(self, it: int, info: dict[str, Any]) -> None:
        losses, tokens, seconds = zip(*self._window)
        extra = {k: sum(m[k] for m in self._extra) / len(self._extra) for k in self._extra[0]} if self._extra else {}
        self._window, self._extra = [], []
        loss = sum(losses) / len(losses)
        self.metrics.update(final_train_loss=loss, trained_tokens=info["trained_tokens"])
        self.metrics.update({f"final_{k}": v for k, v in extra.items()})
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
                **extra,
            }
        )

    def finish(self) -> None:
        """With keep=best, the published adapter is the one of the lowest validation loss. After an
        early stop for retention, the last one whose retention passed (or, with none, the last);
        after one for patience, the best (keep=best) or the weights it stopped with."""
        best_file = self.out_dir / BEST_FILE
        retained = self.out_dir / RETAINED_FILE
        if self.stopped is not None:
            self.metrics["stopped_early"] = self.stopped
        if self.stopped_by == "patience":  # the best (with keep=best) or the weights it stopped with
            self._save(self.out_dir / "adapters.safetensors")
        if self.stopped_by == "retention":
            if retained.exists():
                retained.replace(self.out_dir / "adapters.safetensors")
                self.metrics["kept"] = f"retained (iteration {self.metrics['retained_iteration']})"
            else:
                self._save(self.out_dir / "adapters.safetensors")
                self.metrics["kept"] = "last"
            best_file.unlink(missing_ok=True)
            return
        retained.unlink(missing_ok=True)
        if self.params.keep == "best" and best_file.exists():
            best_file.replace(self.out_dir / "adapters.safetensors")
            assert self.best is not None  # the best file is written with it
            self.metrics["kept"] = f"best (iteration {self.best[1]})"
        else:
            self.metrics["kept"] = "last"
