"""The runner: queued jobs one at a time, in submission order, each in a fresh worker process,
so that a crash in MLX ends one job and never the server. The worker reports events over a
pipe; the runner writes them to the store, where the API reads them."""

from __future__ import annotations

import logging
import multiprocessing
import threading
from multiprocessing.process import BaseProcess
from typing import Any

import msgspec

from ..types import JobSpec, encode_spec
from . import worker
from .store import JobStore

log = logging.getLogger("mlx_lora_api")


class Runner:
    """Runs queued jobs one at a time, FIFO, each in a fresh worker process."""

    KILL_GRACE = 5.0

    def __init__(self, store: JobStore, worker_args: tuple = ()):
        self.store = store
        self.worker_args = worker_args  # passed to worker.process_main after the spec
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: tuple[str, BaseProcess] | None = None
        self._context = multiprocessing.get_context("spawn")

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._current:
            self._terminate(self._current[1])
        if self._thread:
            self._thread.join(timeout=30)

    def cancel(self, job_id: str) -> None:
        current = self._current
        if current and current[0] == job_id:
            self._terminate(current[1])

    def _terminate(self, process: BaseProcess) -> None:
        process.terminate()

        def kill_if_alive() -> None:
            if process.is_alive():
                process.kill()

        threading.Timer(self.KILL_GRACE, kill_if_alive).start()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            claimed = self.store.claim_next()
            if claimed is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            job_id, spec = claimed
            try:
                self._run(job_id, spec)
            except Exception as e:  # the runner must outlive any one job
                log.exception("job %s: runner error", job_id)
                self.store.finish(job_id, "failed", error=f"internal error: {e}")

    def _run(self, job_id: str, spec: JobSpec) -> None:
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=worker.process_main, args=(sender, encode_spec(spec), *self.worker_args), name=f"worker-{job_id}"
        )
        process.start()
        sender.close()
        self._current = (job_id, process)
        self.store.add_event(job_id, {"type": "worker", "pid": process.pid})
        if self.store.cancel_requested(job_id):
            self._terminate(process)
        outcome: dict[str, Any] | None = None
        try:
            while True:
                try:
                    event = msgspec.json.decode(receiver.recv_bytes())
                except (EOFError, OSError):
                    break
                if event["type"] in ("done", "error"):
                    outcome = event
                    continue
                self.store.add_event(job_id, event)
                self.store.update_progress(job_id, event)
                if event["type"] == "checkpoint":
                    self.store.add_checkpoint(job_id, event)
        finally:
            receiver.close()
            process.join()
            self._current = None
        self._settle(job_id, spec, process.exitcode, outcome)

    def _settle(self, job_id: str, spec: JobSpec, exitcode: int | None, outcome: dict | None) -> None:
        if outcome and outcome["type"] == "done" and exitcode == 0:
            self.store.finish(job_id, "success", message=outcome.get("message"))
        elif stopped := self.store.cancel_requested(job_id):
            kept = outcome["message"].partition("; ")[2] if outcome else ""
            self.store.finish(job_id, stopped, message=f"{stopped} while running" + (f"; {kept}" if kept else ""))
        elif self._stopping.is_set():
            self.store.requeue(job_id, "the server was stopped while this job ran; it resumes when the server starts")
        elif outcome and outcome["type"] == "error":
            self.store.finish(job_id, "failed", error=outcome["message"])
        else:
            how = f"was killed by signal {-exitcode}" if exitcode and exitcode < 0 else f"exited with code {exitcode}"
            self.store.finish(job_id, "failed", error=f"the worker process {how} before finishing the job")
