"""Building the service's C code with the system's C compiler, once, when the project is set up
(`./scripts/setup` runs `python -m mlx_lora_api.accel.prebuild`).

Each shared library is cached in the user's cache folder under a key that covers its sources,
the compiler (its `--version`) and the flags, so that any change to one of them builds anew and
an old build is never loaded by mistake. A job never compiles: where the library for today's
key is missing, the speed-up it carries is not used, and the service says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

LEVERS_ENV = "MLX_LORA_API_LEVERS"  # off: mlx-lm's plain path, this package's shims left out too (tuner/levers.py)


def lever_on(name: str | None = None, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether MLX_LORA_API_LEVERS leaves this package's speed-ups on: all of them unless `off`, and
    `name` unless `no-<name>` is among those listed (tuner/levers.py reads the variable in full, above
    MLX; this package is read before MLX loads)."""
    value = environ.get(LEVERS_ENV, "on").strip().lower()
    return value != "off" and (name is None or f"no-{name}" not in {part.strip() for part in value.split(",")})


class BuildError(OSError):
    pass


def compiler() -> str:
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if found is None:
        raise BuildError("no C compiler (cc)")
    return found


def _version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"could not run the C compiler {cc!r}: {e}") from e


def target(name: str, sources: Sequence[Path], flags: Sequence[str], cc: str | None = None) -> Path:
    """Where the library built from these sources with this compiler and flags is (or would be)."""
    cc = cc or compiler()
    key = hashlib.sha256()
    for part in (*(s.read_bytes() for s in sources), _version(cc).encode(), " ".join(flags).encode()):
        key.update(hashlib.sha256(part).digest())
    return cache_folder() / f"{name}-{key.hexdigest()[:16]}.so"


def cache_folder() -> Path:
    """The user's cache folder for what belongs to this machine: builds, and timings (bf16/timings.py)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-lora-api"


def build(name: str, sources: Sequence[Path], flags: Sequence[str]) -> Path:
    """Compile `sources[0]` (the rest are headers it includes) unless today's key is built
    already; returns the library's path."""
    cc = compiler()
    path = target(name, sources, flags, cc)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        built = subprocess.run([cc, *flags, "-o", str(partial), str(sources[0])], capture_output=True, text=True)
    except OSError as e:
        raise BuildError(f"could not run the C compiler {cc!r}: {e}") from e
    if built.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"the C compiler failed: {built.stderr.strip()[-300:]}")
    os.replace(partial, path)  # whole, or not at all
    return path
