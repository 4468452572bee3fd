"""The server's side of generation: one long-lived process that holds the loaded models,
started on first use and again after a crash. No MLX here."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import threading
from typing import Any, Iterator

import msgspec

from . import errors

log = logging.getLogger("mlx_lora_api")


def default_budget() -> int:
    """Half the machine's memory, at most 8 GiB, for loaded models."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 << 30
    return min(total // 2, 8 << 30)


class Generator:
    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = budget_bytes or default_budget()
        self._lock = threading.Lock()
        self._context = multiprocessing.get_context("spawn")
        self._process: multiprocessing.Process | None = None
        self._conn = None
        self._ids = itertools.count(1)

    def _ensure_started(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        from . import generation

        parent, child = self._context.Pipe(duplex=True)
        self._process = self._context.Process(
            target=generation.process_main, args=(child, self.budget_bytes), name="generation", daemon=True
        )
        self._process.start()
        child.close()
        self._conn = parent

    def stream(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Events of one generation; one at a time, the others wait their turn."""
        with self._lock:
            self._ensure_started()
            request_id = next(self._ids)
            self._conn.send_bytes(msgspec.json.encode({**request, "id": request_id}))
            finished = False
            try:
                while True:
                    try:
                        event = msgspec.json.decode(self._conn.recv_bytes())
                    except (EOFError, OSError) as e:
                        self._process = None
                        finished = True
                        raise errors.ServiceError("the generation process stopped unexpectedly; try again") from e
                    if event.pop("id", None) != request_id:
                        continue  # the tail of a generation a client walked away from
                    finished = event["type"] in ("end", "error")
                    yield event
                    if finished:
                        return
            finally:
                if not finished and self._process is not None:
                    self._conn.send_bytes(msgspec.json.encode({"cancel": request_id}))

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
            self._process = None
