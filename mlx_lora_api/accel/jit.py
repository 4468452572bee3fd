"""MLX's compiled element-wise kernels, built for the CPU they run on.

`mx.compile` on the CPU writes each fused element-wise kernel as C++ and builds it with `g++`,
found on the PATH, adding `-mavx2 -mfma -mf16c` only where MLX itself was built for AVX2. The
`mlx[cpu]` wheel is built for baseline x86-64, so a compiled SwiGLU (mlx-lm's `swiglu`, in every
block of a Llama-like model) calls libm's `fmaf` six times per element of its `exp`, and float16
is converted without F16C's instructions (docs/upstream/exp.md). `prepare()` puts a `g++` ahead
on this process's PATH that adds those three flags where the CPU has them, and
`-ffp-contract=off`: the kernels are the same source built as MLX's AVX2 build builds them, and
give the same bits as MLX's own flags. Without that fourth flag, GCC contracts `a * b + c` into an
fma wherever FMA is enabled (`-std=c++17` does not stop it in C++): RMSNorm's `mean + eps` and the
rotation's `x1 * cos - x2 * sin` then rounded once where MLX's uncompiled ops round twice, and a
compiled decoding step no longer gave the model's own logits (tests/test_generation.py). SmolLM2's
SwiGLU over 30 blocks, 2 Zen 4 cores: 8 rows 10.2 -> 6.0 ms, a batch of prompts (288 rows) 271 ->
135 ms (scripts/bench_jit.py).

MLX keeps the kernels it built in `$TMPDIR/mlx/<version>/cpu` and reuses them by name, whatever
flags built them: on a machine where any MLX program compiled before (mlx-lm's own `swiglu`, in
every Llama block), the kernels in `/tmp` were built without these flags and would be used for
good. So `prepare()` also points this process's TMPDIR, which MLX reads each time it looks for a
kernel, at a folder beside the wrapper (Python's own temporary files stay where they were: its
`tempfile` has read the old value first), and a child process that prepares gets back the TMPDIR
its parent was given (`GIVEN_TMPDIR`), unless the parent chose another for it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from . import native

log = logging.getLogger("mlx_lora_api")

LEVER = "jit_avx2"  # MLX_LORA_API_LEVERS=no-jit_avx2 (or off) leaves MLX's own flags
FLAGS = ("-mavx2", "-mfma", "-mf16c", "-ffp-contract=off")
NEEDS = ("avx2", "fma", "f16c")  # /proc/cpuinfo's names for what FLAGS let the compiler use

FOLDER_ENV = "MLX_LORA_API_JIT"  # the folder prepare() put first on the PATH and made the TMPDIR
GIVEN_TMPDIR = "MLX_LORA_API_GIVEN_TMPDIR"  # the TMPDIR before that

_state: dict[str, Path | None] = {}


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the levers leave this on (tuner/levers.py names it; read here, below MLX)."""
    return native.lever_on(LEVER, environ)


def cpu_has(needs: tuple[str, ...] = NEEDS, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(needs) <= set(line.split(":", 1)[1].split())
    return False


def prepare() -> Path | None:
    """Before MLX's first compiled kernel in this process: the `g++` that adds FLAGS, first on
    the PATH; returns its folder, or None where it does not apply (not Linux on x86_64, no `g++`,
    a CPU without AVX2, FMA or F16C, or the lever off). Safe to call many times."""
    if "folder" in _state:
        return _state["folder"]
    _state["folder"] = None
    path = _undo_parent()
    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64") or not wanted() or not cpu_has():
        return None
    compiler = shutil.which("g++", path=os.pathsep.join(path))
    if compiler is None:
        return None  # MLX then does not compile on the CPU either (it runs each op on its own)
    try:
        folder = _wrapper(Path(compiler))
    except OSError as e:  # a cache folder it cannot write: MLX's own flags, as without the lever
        log.warning("MLX's compiled kernels keep MLX's own flags: %s", e)
        return None
    os.environ["PATH"] = os.pathsep.join([str(folder), *path])
    _keep_kernels_in(folder)
    _state["folder"] = folder
    return folder


def _undo_parent() -> list[str]:
    """What a parent that prepared passes on undone, as it is not this process's choice: its
    `g++` first on the PATH, and its TMPDIR where the parent did not choose another for this
    process. Returns the PATH's folders."""
    path = os.environ.get("PATH", os.defpath).split(os.pathsep)
    folder, given = os.environ.pop(FOLDER_ENV, None), os.environ.pop(GIVEN_TMPDIR, None)
    if not folder:
        return path
    path = [p for p in path if p != folder]
    if "PATH" in os.environ:
        os.environ["PATH"] = os.pathsep.join(path)
    if os.environ.get("TMPDIR") == folder and given is not None:
        if given:
            os.environ["TMPDIR"] = given
        else:
            del os.environ["TMPDIR"]
    return path


def _keep_kernels_in(folder: Path) -> None:
    """MLX's kernels built with FLAGS kept under `folder`, apart from any built without them."""
    tempfile.tempdir = tempfile.gettempdir()  # this process's temporary files: where they were
    os.environ[GIVEN_TMPDIR] = os.environ.get("TMPDIR", "")
    os.environ["TMPDIR"] = os.environ[FOLDER_ENV] = str(folder)  # MLX: $TMPDIR/mlx/<version>/cpu


def _wrapper(compiler: Path) -> Path:
    """A folder holding a `g++` that runs `compiler` with FLAGS first, written once per compiler."""
    script = f'#!/bin/sh\nexec {shlex.quote(str(compiler))} {" ".join(FLAGS)} "$@"\n'
    folder = native.cache_folder() / "jit" / hashlib.sha256(script.encode()).hexdigest()[:16]
    path = folder / "g++"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".g++.{os.getpid()}"
        partial.write_text(script)
        partial.chmod(0o755)
        os.replace(partial, path)  # whole, or not at all: another process may be running it
    return folder
