"""Can a worker start here? A process started as a job's worker is (spawned, BLAS first), which
loads MLX and says what it found: versions, device, BLAS. `/health` asks once, and again after
a failure; the server itself never loads MLX."""

from __future__ import annotations

import multiprocessing
import threading
import time
from importlib import metadata
from multiprocessing.connection import Connection
from typing import Any

from .process import begin, describe_error

RETRY_AFTER_FAILURE = 60.0  # seconds before a failed probe is tried again


def process_main(conn: Connection) -> None:
    try:
        begin("probe")
        from .. import device  # MLX, in this process only
        from ..accel import blas

        found: dict[str, Any] = {"mlx": metadata.version("mlx"), "mlx_lm": metadata.version("mlx-lm")}
        found["device"] = "cpu" if device.on_cpu() else "gpu"
        found.update(blas.describe())
        found["matmul_gflops"] = device.matmul_gflops()
        conn.send({"ok": True, **found})
    except BaseException as e:  # everything goes back to the server as a reason
        conn.send({"ok": False, "error": describe_error(e)})
    finally:
        conn.close()


class Probe:
    def __init__(self, timeout: float = 120.0):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._result: dict[str, Any] | None = None
        self._at = 0.0

    def known(self) -> dict[str, Any] | None:
        """The result where a probe has run (/health, /datasets/check); None, and nothing started, where not."""
        return self._result

    def result(self) -> dict[str, Any]:
        """What a worker process found, or {"ok": False, "error"} where none could start."""
        with self._lock:
            stale = self._result is not None and not self._result["ok"] and time.time() - self._at > RETRY_AFTER_FAILURE
            if self._result is None or stale:
                self._result, self._at = self._run(), time.time()
            return self._result

    def _run(self) -> dict[str, Any]:
        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        try:
            process = context.Process(target=process_main, args=(sender,), name="worker-probe", daemon=True)
            process.start()
        except OSError as e:
            return {"ok": False, "error": f"a worker process could not start: {describe_error(e)}"}
        finally:
            sender.close()
        try:
            if not receiver.poll(self.timeout):
                process.kill()
                return {"ok": False, "error": f"a worker process did not report within {self.timeout:.0f} s"}
            found: dict[str, Any] = receiver.recv()
        except (EOFError, OSError):
            process.join(timeout=10)
            found = {
                "ok": False,
                "error": f"a worker process could not start (it exited with code {process.exitcode} before reporting)",
            }
        finally:
            receiver.close()
            process.join(timeout=10)
        return found
