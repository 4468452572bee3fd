"""Which of a model's matmuls pay in bfloat16 on this CPU: each product shape is timed once,
float32 (MLX and the BLAS) against every bfloat16 gemm that runs here (gemms.py), and the
timings are kept in the user's cache folder under a key for this CPU model, its cores, the
BLAS's kernels, MLX's version and the bfloat16 kernel's build, so that the next job on the same
machine (or another machine of the same model) decides without timing again.

On an AMD EPYC Zen 4 (AVX-512 BF16, double-pumped) the service's kernel is twice as fast as
float32 on the output layer and the MLP's down projection, and no faster on the attention
projections at a chat batch's 224 rows: one timing for the whole model (what was done before)
chose float32 for all of them, or bfloat16 for all.

A product is timed with its rows rounded up to a power of two (`bucket`), at most `MAX_ROWS`
and `MAX_FLOP` a call: rates hardly change past that, and the output layer's 49,152 columns
would otherwise take seconds. Each time is the whole call as training makes it: the input's
rounding to bfloat16, the threads' wake-up and the copy of the result into an MLX array.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import mlx.core as mx

from ...accel import blas, native
from .gemms import engines
from .matmul import FLOAT32, Products, Weight

MIN_GAIN = 1.1  # bfloat16 is used for a matmul where it is at least this much faster than float32
MAX_ROWS = 1024
MAX_FLOP = 8e9
VERSION = 1  # of the file's layout and of what is timed


def bucket(rows: int, n: int, k: int) -> int:
    """The rows a product of `rows` x `k` by `k` x `n` is timed with."""
    timed = 64
    while timed < rows and timed < MAX_ROWS and 2 * (2 * timed) * n * k <= MAX_FLOP:
        timed *= 2
    return timed


@functools.cache
def cpu() -> dict[str, Any]:
    """What the timings depend on, besides the shapes (once a process: it asks the C compiler
    its version for the kernel's build key)."""
    info: dict[str, Any] = {"machine": platform.machine(), "cores": len(os.sched_getaffinity(0))}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip()
        if name in ("model name", "cpu family", "model", "stepping") and name not in info:
            info[name] = value.strip()
        if name == "flags" and "flags" not in info:
            info["flags"] = sorted(f for f in value.split() if "avx512" in f or f.startswith("amx"))
    found = blas.describe()
    info["blas"] = f"{found['blas']} ({found['blas_kernels']})"
    info["mlx"] = metadata.version("mlx")
    info["engines"] = {name: _build_of(name) for name, why in engines().items() if why is None}
    return info


def _build_of(engine: str) -> str:
    if engine == "avx512":
        from . import build

        return build.target().name
    from .gemms import mkl

    return str(mkl()._name)


def default_path() -> Path:
    """This CPU's file in the user's cache folder (where the kernels' builds are too)."""
    key = hashlib.sha256(json.dumps(cpu(), sort_keys=True).encode()).hexdigest()[:16]
    return native.cache_folder() / f"bf16-timings-{key}.json"


class Timings:
    """Seconds a call of each product shape takes, by engine, measured where not known yet and
    written back (whole, or not at all). `path` None: kept in this process only."""

    def __init__(self, path: Path | None, measure: Callable[[int, int, int, bool], dict[str, float]] | None = None):
        self.path = path
        self._measure = measure or measure_product
        self.measured = 0  # shapes timed by this process (the rest came from the file)
        self._seconds: dict[str, dict[str, float]] = {}
        if path is not None and path.exists():
            try:
                stored = json.loads(path.read_text())
                if stored.get("version") == VERSION:
                    self._seconds = stored["seconds"]
            except (OSError, ValueError, KeyError, TypeError):
                self._seconds = {}  # unreadable: timed afresh, and written over

    def seconds(self, rows: int, n: int, k: int, transpose: bool = True) -> dict[str, float]:
        """{engine: seconds} of (rows, k) @ (k, n) at `rows`' bucket; `transpose`: the weight is
        (n, k) and multiplies transposed (forward), else it is (k, n) (the output layer's gradient)."""
        timed = bucket(rows, n, k)
        key = f"{timed}x{n}x{k}{'' if transpose else 'n'}"
        if key not in self._seconds:
            self._seconds[key] = self._measure(timed, n, k, transpose)
            self.measured += 1
            self._save()
        return self._seconds[key]

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            partial.write_text(json.dumps({"version": VERSION, "cpu": cpu(), "seconds": self._seconds}, indent=1))
            os.replace(partial, self.path)
        except OSError:
            pass  # not kept: timed again by the next job

    def choose(self, products: Products, rows: Counter[int]) -> tuple[str, float, float]:
        """The fastest way for a set of products (each `(n, k, transpose)`) made once a step, with
        `rows[m]` steps of m rows: (engine or FLOAT32, float32's seconds, the engine's seconds), a
        training run's worth. A bfloat16 engine only where it is at least MIN_GAIN faster."""
        totals: defaultdict[str, float] = defaultdict(float)
        for n, k, transpose in products:
            for m, steps in rows.items():
                for engine, seconds in self.seconds(m, n, k, transpose).items():
                    totals[engine] += steps * seconds * m / bucket(m, n, k)
        float32 = totals.pop(FLOAT32)
        if not totals:
            return FLOAT32, float32, float32
        best = min(totals, key=lambda e: totals[e])
        return (best if float32 >= MIN_GAIN * totals[best] else FLOAT32), float32, totals[best]


def measure_product(m: int, n: int, k: int, transpose: bool, repeats: int = 5) -> dict[str, float]:
    """Median seconds of (m, k) @ W.T (W (n, k); transpose) or @ W (W (k, n)) in float32 through
    MLX and in bfloat16 through each gemm here, after 3 warm-up calls, alternating engines call
    by call so that a noisy moment weighs on each alike."""
    a = mx.random.normal((m, k))
    w = mx.random.normal((n, k) if transpose else (k, n))
    mx.eval(a, w)
    weight = Weight(w)
    calls: dict[str, Callable[[], Any]] = {FLOAT32: lambda: mx.eval(a @ (w.T if transpose else w))}
    for name, why in engines().items():
        if why is None:
            calls[name] = lambda name=name: mx.eval(mx.array(weight.product(a, transpose, name)))
    for _ in range(3):
        for call in calls.values():
            call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(s) for name, s in seconds.items()}
