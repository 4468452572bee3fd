"""What every process of the server that runs MLX shares (a job's worker, the generation
process): it dies with the server, loads the fast BLAS before MLX, and turns errors into one
line a user can act on."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys

from ..accel import blas
from ..tasks.checks import DamagedArtifact


class Failed(RuntimeError):
    """A job's failure whose message says all there is to say (a rank that failed, and where)."""


class Cancelled(Exception):
    """Raised in the worker by SIGTERM, so that a cancelled job unwinds and keeps its checkpoints."""

    def __str__(self) -> str:
        return "cancelled"


def describe_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        text = f"the disk is full: {error}"
    elif isinstance(error, MemoryError):
        text = "out of memory"
    elif isinstance(error, (ValueError, FileNotFoundError, KeyError, Cancelled, DamagedArtifact, Failed)):
        text = str(error) or type(error).__name__
    else:
        text = f"{type(error).__name__}: {error}"
    return "; ".join([text, *getattr(error, "__notes__", [])])


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (a job's worker is a process of its own)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def die_with_parent() -> None:
    """On Linux, end with the server even when it is killed, so that no orphan keeps writing
    into a job's folder while a restarted server resumes it (elsewhere the pipe breaking ends
    the worker at its next event)."""
    if sys.platform.startswith("linux"):
        import ctypes  # Linux only

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# Jobs that write a model's weights and check them against what they were made from. MLX computes
# float32 matmuls in TF32 (a 10-bit mantissa, ~1e-3 relative error) on CUDA and on M5 GPUs unless
# MLX_ENABLE_TF32=0, which it reads once, at a process's first matmul: a fused layer checked to
# float32's 1e-5 would be refused there (seen on an H100: 6.9e-4). Training and generation keep
# MLX's default, fast, and run in the model's own dtype on a GPU anyway.
EXACT_FLOAT32_JOBS = ("fuse", "quantize", "export")


def set_precision(kind: str) -> None:
    """Before MLX's first matmul in this process: full float32 for the jobs above."""
    if kind in EXACT_FLOAT32_JOBS:
        os.environ["MLX_ENABLE_TF32"] = "0"


def begin(name: str, decoding: bool = False) -> None:
    """The first thing such a process does: before anything imports MLX. `decoding`: the
    generation process (accel/gemv.py)."""
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    blas.prepare(decoding)
