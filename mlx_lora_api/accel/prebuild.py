"""What `./scripts/setup` builds (accel/native.py): the matrix-vector shim (gemv.py), the training's
element-wise kernels (elementwise.py), and on x86 the AVX-512 BF16 kernel (bf16/build.py)."""

from __future__ import annotations

import platform
import sys

from . import elementwise, gemv
from .bf16 import build as bf16
from .native import BuildError


def main() -> int:
    """Build what this machine can use; an optional speed-up missing never stops the set-up."""
    wanted = [
        (gemv.build, "matrix-vector shim (fast decoding)", gemv.WITHOUT),
        (elementwise.build, "element-wise kernels (training)", elementwise.WITHOUT),
    ]
    if platform.machine() in ("x86_64", "AMD64"):
        wanted.append((bf16.build, "AVX-512 BF16 kernel", "cpu_bfloat16 will use oneMKL or float32"))
    for make, what, without in wanted:
        try:
            path = make()
        except BuildError as e:
            print(f"setup: the {what} was not built ({e}); {without}", file=sys.stderr)
            continue
        print(f"setup: {what} ready ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
