"""bfloat16 matmuls for the frozen weights on the CPU, through oneMKL (opt-in: `cpu_bfloat16`).

On the CPU the service computes in float32 (MLX's CPU bfloat16 matmul runs at about 5
GFLOP/s). CPUs with Intel AMX or AVX-512 BF16 multiply bfloat16 much faster than float32:
oneMKL's `cblas_gemm_bf16bf16f32` (bfloat16 inputs, float32 accumulation and result)
measured 600-1,200 GFLOP/s at a LoRA step's shapes on a 2-core Sapphire Rapids, against
250-340 for OpenBLAS's float32 sgemm. Where it is not faster (`slower`), training stays in
float32: on a 2-core AMD EPYC (Zen 5, AVX-512 BF16) it measured about 220 GFLOP/s against
OpenBLAS's 400-480. `convert(model)` puts bfloat16 matmuls in place of those with the
weights that do not train: every frozen `nn.Linear` in the blocks (LoRA's base layers too;
forward, and backward where MLX's graph allows: see `linear`) and the output layer of
`cpu_kernels.cross_entropy` (both ways). The LoRA matrices, attention and everything
element-wise stay float32, as under PyTorch's bfloat16 autocast. Not exact: inputs are rounded
to bfloat16 (8 significant bits), so losses move in the third decimal.

MKL comes from PyPI's `mkl` wheel (the project's `bf16` extra), loaded privately (RTLD_LOCAL)
beside the OpenBLAS that MLX's own matmuls use.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from pathlib import Path

MKL_ENV = "MLX_LORA_API_MKL"  # path of libmkl_rt.so, or "none"
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
MIN_GAIN = 1.2  # bfloat16 is used where its matmul is at least this much faster than float32's
_lib: list = []
_timed: dict[str, str | None] = {}


def _mkl():
    if _lib:
        return _lib[0]
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
    _lib.append(lib)
    return lib


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def unavailable() -> str | None:
    """Why bfloat16 matmuls cannot be used here, or None."""
    from . import backend

    if not backend.on_cpu():
        return "off the CPU the model trains in its own dtype"
    if not cpu_has_bf16():
        return "this CPU has neither AMX nor AVX-512 BF16"
    try:
        _mkl()
    except OSError as e:
        return str(e)
    return None


def slower() -> str | None:
    """Why bfloat16 matmuls would not speed training up here, or None: oneMKL's bfloat16 gemm
    and MLX's float32 one, timed once per process on a block-sized product (about 0.15 s)."""
    if "slower" not in _timed:
        bf16_gflops, fp32_gflops = _measure()
        _timed["slower"] = None if bf16_gflops >= MIN_GAIN * fp32_gflops else (
            f"oneMKL's bfloat16 matmul runs at {bf16_gflops:.0f} GFLOP/s on this CPU, float32's at "
            f"{fp32_gflops:.0f}: not the {MIN_GAIN}x it takes to pay off"
        )
    return _timed["slower"]


def _measure(m: int = 512, n: int = 1536, k: int = 1024, repeats: int = 5) -> tuple[float, float]:
    """GFLOP/s of (m, k) x (k, n) in bfloat16 through oneMKL and in float32 through MLX, each
    the best of `repeats` after 50 ms of warm-up calls (thread pools, buffers, clocks: a fresh
    process's first calls measured up to 55% slow)."""
    import time

    import mlx.core as mx

    a, w = mx.random.normal((m, k)), mx.random.normal((n, k))
    mx.eval(a, w)
    weight, a_bits = Weight(w), bits(a)

    def rate(step) -> float:
        warm = time.perf_counter() + 0.05
        while time.perf_counter() < warm:
            step()
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - started)
        return 2 * m * n * k / best / 1e9

    fp32 = rate(lambda: mx.eval(a @ w.T))  # first: oneMKL's threads spin on for a while after a call
    return rate(lambda: weight.matmul(a_bits, True)), fp32


def bits(x) -> "np.ndarray":
    """x (an MLX float array) rounded to bfloat16 (to nearest even, by MLX), as uint16 numpy."""
    import mlx.core as mx
    import numpy as np

    y = x.astype(mx.bfloat16).view(mx.uint16)
    mx.eval(y)
    return np.asarray(y)


class Weight:
    """A frozen (out, in) float32 weight, kept as bfloat16 for `matmul`, and as it is too
    where gradients pass through it (`float32`; see `linear`)."""

    def __init__(self, weight, float32: bool = False):
        import numpy as np

        self.bits = np.ascontiguousarray(bits(weight))
        self.shape = tuple(weight.shape)
        self.float32 = weight if float32 else None

    def matmul(self, a: "np.ndarray", transpose: bool) -> "np.ndarray":
        """a (M, K) uint16 bfloat16 bits times W.T (transpose: K = in) or W (K = out), in float32."""
        import numpy as np

        out_features, in_features = self.shape
        m, k = a.shape
        n = out_features if transpose else in_features
        if k != (in_features if transpose else out_features):
            raise ValueError(f"matmul of {a.shape} with a weight of {self.shape}")
        a = np.ascontiguousarray(a)
        c = np.empty((m, n), np.float32)
        _mkl().cblas_gemm_bf16bf16f32(
            _ROW_MAJOR, _NO_TRANS, _TRANS if transpose else _NO_TRANS, m, n, k, ctypes.c_float(1.0),
            ctypes.c_void_p(a.ctypes.data), k, ctypes.c_void_p(self.bits.ctypes.data), in_features,
            ctypes.c_float(0.0), ctypes.c_void_p(c.ctypes.data), n,
        )
        return c


def linear(x, weight: Weight, sizes: list[int] | None = None):
    """x @ weight.T with x's gradient (the weight is frozen); evaluates mid-graph (eager steps).
    With `sizes`, the weight is several layers' stacked (q, k and v, say): their outputs in one
    matmul.

    x's gradient is MLX's float32 matmul where the weight keeps its float32 copy: evaluating
    in the middle of the backward pass would keep every array of the step alive until its end
    (MLX keeps the graph of arrays it evaluates inside a transformation): at 4 x 488 tokens the
    peak went from 3.7 to 6.4 GB, and the step got slower."""
    import mlx.core as mx

    out_features, in_features = weight.shape
    sizes = sizes or [out_features]
    cuts = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    lead = x.shape[:-1]

    @mx.custom_function
    def fn(x):
        y = mx.array(weight.matmul(bits(x.reshape(-1, in_features)), True)).reshape(*lead, out_features)
        return mx.split(y, cuts, axis=-1) if cuts else [y]

    @fn.vjp
    def _(x, cotangents, outputs):  # one primal: passed, and its gradient returned, as is
        d = mx.concatenate(cotangents, axis=-1) if cuts else cotangents[0]
        if weight.float32 is not None:
            return d @ weight.float32
        grad = weight.matmul(bits(d.reshape(-1, out_features)), False)
        return mx.array(grad).reshape(*lead, in_features)

    return fn(x)


# Layers that mlx-lm's models call on the same input, one after the other.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class Group:
    """Frozen linear layers multiplied together: the first member's call computes every
    member's output for its input, which the others' calls with the same input (the same
    array) take; a call with another input, or a member's second call, computes afresh. The
    outputs are let go once every member has taken its own (holding them would hold the
    step's graph)."""

    def __init__(self, weights: list, float32: bool = False):
        import mlx.core as mx

        self.sizes = [w.shape[0] for w in weights]
        self.weight = Weight(mx.concatenate(weights) if len(weights) > 1 else weights[0], float32)
        self._input = None
        self._outputs: list = []
        self._waiting: set[int] = set()

    def __call__(self, x, index: int):
        if self._input is not x or index not in self._waiting:
            self._input, self._outputs = x, linear(x, self.weight, self.sizes)
            self._waiting = set(range(len(self.sizes)))
        self._waiting.discard(index)
        output = self._outputs[index]
        if not self._waiting:
            self._input, self._outputs = None, []
        return output


def _member_class():
    import mlx.nn as nn

    class Member(nn.Module):
        """A frozen nn.Linear whose matmul runs in bfloat16, alone or in a `Group`."""

        def __init__(self, group: Group, index: int, original: nn.Linear):
            super().__init__()
            self.group, self.index = group, index
            if "bias" in original:
                self.bias = original.bias
            self.freeze()

        def __call__(self, x):
            y = self.group(x, self.index)
            return y + self.bias if "bias" in self else y

    return Member


def _frozen_linears(model) -> list[tuple]:
    """(owner, role, parent, name, backward) of every frozen float32 nn.Linear in the blocks:
    it is parent[name], the model calls it as owner[role] (itself, or the LoRALinear around it;
    not DoRA's, which reads its base layer's weight itself), and with `backward` gradients pass
    through it (it is in or after the first block that trains)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear

    blocks = model.model.layers
    trains = [i for i, block in enumerate(blocks) if tree_flatten(block.trainable_parameters())]
    first = trains[0] if trains else len(blocks)
    found = []
    for i, module in ((i, m) for i, block in enumerate(blocks) for _, m in block.named_modules()):
        if hasattr(module, "lora_a"):
            continue  # a wrapper: seen from its owner
        for role, child in module.children().items():
            parent, name = (child, "linear") if type(child) is LoRALinear else (module, role)
            base = parent[name] if isinstance(parent[name], nn.Module) else None
            if type(base) is nn.Linear and base.weight.dtype == mx.float32 and not base.trainable_parameters():
                found.append((module, role, parent, name, i >= first))
    return found


def convert(model, on_event=lambda event: None) -> int:
    """Make `model`'s frozen linear layers and output layer multiply in bfloat16 (see the
    module's doc), layers that share their input (`GROUPS`) in one matmul; returns how many
    weights were converted. One way: the frozen layers' float32 weights are let go (memory), so
    the model is for this training run only afterwards; the trainable parameters, which the
    adapter file holds, stay float32."""
    from . import cpu_kernels

    Member = _member_class()
    layers = _frozen_linears(model)
    by_owner: dict[int, dict[str, tuple]] = {}
    for owner, role, parent, name, backward in layers:
        by_owner.setdefault(id(owner), {})[role] = (parent, name, backward)
    for roles in by_owner.values():
        sets = [g for g in GROUPS if all(r in roles for r in g)]
        sets += [(r,) for r in roles if not any(r in g for g in sets)]
        for members in sets:
            originals = [roles[r][0][roles[r][1]] for r in members]
            if len({o.weight.shape[1] for o in originals}) > 1:
                sets += [(r,) for r in members]
                continue
            group = Group([o.weight for o in originals], float32=roles[members[0]][2])
            for i, (r, original) in enumerate(zip(members, originals)):
                parent, name, _ = roles[r]
                parent[name] = Member(group, i, original)
    head = cpu_kernels.output_weight(model)
    if head is not None:
        model.bf16_output = Weight(head)  # read by losses.hidden_mean
    count = len(layers) + (head is not None)
    on_event({"type": "info", "message": f"cpu_bfloat16: {count} frozen weights multiply in bfloat16 (oneMKL)"})
    return count
