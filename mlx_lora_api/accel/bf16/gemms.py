"""The bfloat16 gemms that can run on this machine: the service's AVX-512 BF16 kernel (built by
build.py) and oneMKL's `cblas_gemm_bf16bf16f32` (the `bf16` extra), loaded privately beside
the OpenBLAS that MLX uses. No MLX here but the device question."""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from pathlib import Path
from typing import Any

from ... import device
from . import build

MKL_ENV = "MLX_LORA_API_MKL"  # path of libmkl_rt.so, or "none"
ENGINES = {"avx512": "the service's AVX-512 BF16 kernel", "mkl": "oneMKL"}
_libs: dict[str, Any] = {}  # a loaded library, or the OSError that says why it cannot load


def mkl() -> ctypes.CDLL:
    if "mkl" in _libs:
        return _libs["mkl"]
    path = os.environ.get(MKL_ENV)
    if path == "none":
        raise OSError(f"{MKL_ENV}=none")
    if not path:
        found = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
        if not found:
            raise OSError("oneMKL is not installed (pip install 'mlx-lora-api[bf16]', or `pip install mkl`)")
        path = found[0]
    os.environ.setdefault("MKL_NUM_THREADS", str(os.cpu_count() or 1))
    lib = ctypes.CDLL(path)
    lib.cblas_gemm_bf16bf16f32.restype = None
    _libs["mkl"] = lib
    return lib


def kernel() -> ctypes.CDLL:
    """The AVX-512 BF16 kernel as `build.py` built it for this source, compiler and flags."""
    if "avx512" in _libs:
        return _libs["avx512"]
    if " avx512_bf16" not in _cpuinfo():
        raise OSError("this CPU has no AVX-512 BF16")
    path = build.target()
    if not path.exists():
        raise OSError("the AVX-512 BF16 kernel is not built for this compiler: run ./scripts/setup")
    # OpenMP's idle threads would otherwise spin after each product, taking the core that
    # MLX's single-threaded ops and OpenBLAS need next (3-epoch chat run 25.0 -> 15.1 s).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when libgomp loads, just below
    lib = ctypes.CDLL(str(path))
    lib.bf16_matmul.restype = None
    lib.bf16_pack.restype = None
    _libs["avx512"] = lib
    return lib


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_bf16() -> bool:
    flags = _cpuinfo()
    return " amx_bf16" in flags or " avx512_bf16" in flags


def engines() -> dict[str, str | None]:
    """Each bfloat16 gemm: None where it can run here, else why not (asked once a process: a
    failed build is not tried again at every call)."""
    found: dict[str, str | None] = {}
    for name, load in (("avx512", kernel), ("mkl", mkl)):
        if isinstance(_libs.get(name), OSError):
            found[name] = str(_libs[name])
            continue
        try:
            load()
            found[name] = None
        except OSError as e:
            _libs[name] = e
            found[name] = str(e)
    return found


def unavailable() -> str | None:
    """Why bfloat16 matmuls cannot be used here, or None."""
    if not device.on_cpu():
        return "off the CPU the model trains in its own dtype"
    if not cpu_has_bf16():
        return "this CPU has neither AMX nor AVX-512 BF16"
    found = engines()
    if all(found.values()):
        return "no bfloat16 gemm can run here: " + "; ".join(str(why) for why in found.values())
    return None
