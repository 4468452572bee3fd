"""Building the AVX-512 BF16 kernel (gemm.c) with the system's C compiler, once, when the
project is set up (`./scripts/setup` runs `build.main()`).

The shared library is cached in the user's cache folder under a key that covers the source,
the compiler (its `--version`) and the flags, so that any change to one of them builds anew
and an old build is never loaded by mistake. A job never compiles: where the library for
today's key is missing, `cpu_bfloat16` says so and training stays float32.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("gemm.c")
HEADERS = (Path(__file__).with_name("round.h"),)
FLAGS = ("-O3", "-mavx512f", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC")


class BuildError(OSError):
    pass


def compiler() -> str:
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if found is None:
        raise BuildError("no C compiler (cc) to build the AVX-512 BF16 kernel with")
    return found


def _version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"could not run the C compiler {cc!r}: {e}") from e


def target(cc: str | None = None) -> Path:
    """Where the library for this source, compiler and these flags is (or would be) cached."""
    cc = cc or compiler()
    key = hashlib.sha256()
    sources = [SOURCE.read_bytes(), *(h.read_bytes() for h in HEADERS)]
    for part in (*sources, _version(cc).encode(), " ".join(FLAGS).encode()):
        key.update(hashlib.sha256(part).digest())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-lora-api"
    return cache / f"bf16_gemm-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile gemm.c unless today's key is built already; returns the library's path."""
    cc = compiler()
    path = target(cc)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        built = subprocess.run([cc, *FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True)
    except OSError as e:
        raise BuildError(f"could not run the C compiler {cc!r} to build the AVX-512 BF16 kernel: {e}") from e
    if built.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"building the AVX-512 BF16 kernel failed: {built.stderr.strip()[-300:]}")
    os.replace(partial, path)  # whole, or not at all
    return path


def main() -> int:
    try:
        path = build()
    except BuildError as e:
        print(
            f"setup: the AVX-512 BF16 kernel was not built ({e}); cpu_bfloat16 will use oneMKL or float32",
            file=sys.stderr,
        )
        return 0  # an optional speed-up: set-up goes on without it
    print(f"setup: AVX-512 BF16 kernel ready ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
