"""Generation in a process of its own: one long-lived process holds the loaded models
(tasks/generate.py), started on first use and again after a crash. `Generator` is the
server's side; `process_main` the process's, which imports MLX only once it runs there.

Requests go down the pipe as they come, each with an id; the process decodes them together
(tasks/generate.py's `Batcher`) and sends each one's events back under its id; a thread of the
server reads them and hands each to the stream that waits for it."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import msgspec

from .. import errors
from .process import begin, describe_error

log = logging.getLogger("mlx_lora_api")
GENERATION_NICENESS = 5
# An idle generation process that gets a request waits for more while they come at most 10 ms
# apart, at most 30 ms in all: chats sent at once then read their prompts as one batch. Taken as
# they came, the first chat's prompt went alone and the other seven's in a second pass, which the
# first chat's step had kept waiting (8 chats of SmolLM2 on 2 Zen 4 cores, sent together, reached
# the server's generation process within 12 ms, 6 ms between the first two: 154 + 880 ms of steps
# before all 8 had a token, against 857 in one pass). A chat alone waits 10 ms more.
GATHER = (0.010, 0.030)


def default_budget() -> int:
    """Half the machine's memory, at most 8 GiB, for loaded models."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 << 30
    return min(total // 2, 8 << 30)


class Admitted:
    """A generation's event stream holding one of the generator's places until it is exhausted,
    closed or dropped (a client that went away before the first event included)."""

    def __init__(self, events: Iterator[dict[str, Any]], release: Callable[[], None]):
        self._events = events
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Admitted:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            return next(self._events)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            close = getattr(self._events, "close", None)
            if close is not None:
                close()
            release()

    def __del__(self) -> None:
        self.close()


class Generator:
    def __init__(self, budget_bytes: int | None = None, max_concurrent: int = 16):
        self.budget_bytes = budget_bytes or default_budget()
        self.max_concurrent = max_concurrent
        # Generations decode together in the process, as many as this. Past it, running or
        # waiting for their turn (another model's), a request is turned away (429) rather than
        # let them take every thread the server answers other requests with.
        self._places = threading.BoundedSemaphore(max_concurrent)
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation-spawner")
        self._lock = threading.Lock()  # the process, the pipe's sending end, the streams' queues
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._ids = itertools.count(1)
        # Each waiting stream's queue, by request id, with the pipe of the process decoding it.
        self._streams: dict[int, tuple[Connection, queue.SimpleQueue[dict[str, Any] | None]]] = {}

    def _ensure_started(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._conn is not None:
            return self._conn
        # Started from a thread of its own that lives as long as this Generator: the process dies
        # with the thread that started it (PR_SET_PDEATHSIG follows the thread, not the process),
        # and the server's pool threads come and go (a burst of 64 chats killed it mid-stream).
        return self._spawner.submit(self._start).result()

    def _start(self) -> Connection:
        parent, child = self._context.Pipe(duplex=True)
        self._process = self._context.Process(
            target=process_main,
            args=(child, self.budget_bytes, self.max_concurrent),
            name="generation",
            daemon=True,
        )
        self._process.start()
        child.close()
        self._conn = parent
        threading.Thread(target=self._read, args=(parent,), name="generation-events", daemon=True).start()
        return parent

    def _read(self, conn: Connection) -> None:
        """Each event to the stream it belongs to, until the process or the pipe ends; then every
        stream still waiting is told (None)."""
        while True:
            try:
                event = msgspec.json.decode(conn.recv_bytes())
            except (EOFError, OSError):
                break
            with self._lock:
                stream = self._streams.get(event.pop("id", None))
            if stream is not None:  # else the tail of a generation a client walked away from
                stream[1].put(event)
        with self._lock:
            if self._conn is conn:
                self._process, self._conn = None, None
            for stream in self._streams.values():
                if stream[0] is conn:  # not those of a process started since
                    stream[1].put(None)

    def stream(self, request: dict[str, Any]) -> Admitted:
        """Events of one generation, decoded alongside the others (429 past `max_concurrent`)."""
        if not self._places.acquire(blocking=False):
            raise errors.TooManyJobs(
                f"{self.max_concurrent} generations are running or waiting (MLX_LORA_API_MAX_CONCURRENT_GENERATIONS);"
                " try again shortly",
                headers={"Retry-After": "5"},
            )
        return Admitted(self._stream(request), self._places.release)

    def _stream(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        events: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        with self._lock:
            conn = self._ensure_started()
            request_id = next(self._ids)
            self._streams[request_id] = (conn, events)
            conn.send_bytes(msgspec.json.encode({**request, "id": request_id}))
        finished = False
        try:
            while True:
                event = events.get()
                if event is None:
                    finished = True
                    raise errors.ServiceError("the generation process stopped unexpectedly; try again")
                finished = event["type"] in ("end", "error")
                yield event
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
                if not finished and self._conn is conn:  # the client went away: stop decoding it
                    try:
                        conn.send_bytes(msgspec.json.encode({"cancel": request_id}))
                    except OSError:
                        pass  # the process is gone already

    def stop(self) -> None:
        self._spawner.shutdown(wait=False)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
            self._process = None


def process_main(conn: Connection, budget_bytes: int, max_batch: int = 16) -> None:
    """A long-lived generation process: requests and cancellations from `conn` between decoding
    steps, each request's events back under its id."""
    begin("generation", decoding=True)
    # A batch of chats takes both cores of a small machine; the API process must still answer at
    # once (GET /health p99 during 16 batched chats on 2 cores: 130 ms at niceness 0). A job's
    # worker is niced further (10): a chat someone waits for goes ahead of training.
    os.nice(GENERATION_NICENESS)
    from ..tasks import generate  # MLX, in this process only

    batcher = generate.Batcher(generate.ModelCache(budget_bytes), max_batch, describe=describe_error)
    while True:
        try:
            # Wait for work when there is none; otherwise take what came during the last step. Work
            # that comes to an idle process is gathered for a moment first (`GATHER`), so that chats
            # sent together start together.
            idle = not batcher.busy
            gathering_until = time.monotonic() + GATHER[1]
            while not batcher.busy or conn.poll(
                max(0.0, min(GATHER[0], gathering_until - time.monotonic())) if idle else 0
            ):
                message = msgspec.json.decode(conn.recv_bytes())
                if "cancel" in message:
                    batcher.cancel(message["cancel"])
                else:
                    batcher.add(message.pop("id"), **message)
        except (EOFError, OSError):
            return
        for request_id, event in batcher.step():
            conn.send_bytes(msgspec.json.encode({**event, "id": request_id}))
