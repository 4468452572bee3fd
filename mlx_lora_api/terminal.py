"""A job followed in the terminal: a live progress bar (iteration of total, epoch, loss,
validation loss, tokens/s, time left) drawn with rich from the job's events, then a sparkline
of the loss and a one-line summary. Used by the CLI's `--follow` and `logs`; fed events, it
draws; it fetches nothing itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    """`values` as a line of block characters, at most `width` of them (averaged in buckets)."""
    if not values:
        return ""
    if len(values) > width:
        size = len(values) / width
        values = [
            sum(chunk) / len(chunk)
            for i in range(width)
            if (chunk := values[int(i * size) : max(int((i + 1) * size), int(i * size) + 1)])
        ]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(BLOCKS[min(int((v - low) / span * len(BLOCKS)), len(BLOCKS) - 1)] for v in values)


def describe(event: dict[str, Any]) -> str | None:
    """One event as a log line (`logs`), or None for the ones not worth a line."""
    kind = event.get("type")
    if kind == "train":
        return (
            f"iter {event['iteration']:>5}  epoch {event['epoch']:.2f}  loss {event['train_loss']:.4f}  "
            f"{event['tokens_per_second']:.0f} tok/s"
        )
    if kind == "val":
        return f"iter {event['iteration']:>5}  val loss {event['val_loss']:.4f}"
    if kind == "retention":
        return f"retention {event['retention']:.2f} ({event.get('retention_answers_kept', '?')} answers kept)"
    if kind == "checkpoint":
        return f"iter {event['iteration']:>5}  checkpoint {event['file']}"
    if kind in ("failed",):
        return f"failed: {event.get('error') or event.get('message')}"
    if kind in ("worker", "retention_reference"):
        return None
    details = event.get("message") or ", ".join(
        f"{k}={v}" for k, v in event.items() if k not in ("type", "time", "seq", "message", "error") and v is not None
    )
    return f"{kind}: {details}" if details else str(kind)


class Follower:
    """Draws one job's progress from its events, as they come."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.losses: list[float] = []
        self.val_loss: float | None = None
        self.summary: str | None = None
        self.status: str | None = None
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("epoch {task.fields[epoch]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("val {task.fields[val]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> Follower:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def follow(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            self.on_event(event)

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "started":
            self._task = self._progress.add_task(
                "training", total=event["total_iterations"], epoch="-", loss="-", val="-", speed="-"
            )
        elif kind == "resumed" and self._task is not None:
            self._progress.update(self._task, completed=event["iteration"])
        elif kind == "train" and self._task is not None:
            self.losses.append(event["train_loss"])
            self._progress.update(
                self._task,
                completed=event["iteration"],
                epoch=f"{event['epoch']:.2f}",
                loss=f"{event['train_loss']:.4f}",
                speed=f"{event['tokens_per_second']:.0f}",
            )
        elif kind == "val" and self._task is not None:
            self.val_loss = event["val_loss"]
            self._progress.update(self._task, val=f"{event['val_loss']:.4f}")
        elif kind in ("warning", "failed"):
            self._progress.console.print(f"[yellow]{describe(event)}")
        elif kind in ("success", "cancelled", "paused"):
            self.status = kind
            self.summary = event.get("message")
        if kind == "failed":
            self.status = "failed"
            self.summary = event.get("error") or event.get("message")

    def report(self, model_id: str) -> None:
        """After the end: the loss sparkline, then the model id and a one-line summary."""
        if self.losses:
            first, last = self.losses[0], self.losses[-1]
            self.console.print(f"loss {sparkline(self.losses)} {first:.3f} -> {last:.3f}")
        line = f"{self.status or 'ended'}: {model_id}"
        if self.summary:
            line += f" ({self.summary})"
        self.console.print(line)
