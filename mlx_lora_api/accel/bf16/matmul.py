"""bfloat16 matmuls for a model's frozen weights, through the fastest bfloat16 gemm here
(gemms.py), and the timing that decides whether they pay at all.

`convert(model)` puts them in place of the matmuls with the weights that do not train: every
frozen `nn.Linear` in the blocks (LoRA's base layers too; forward, and backward where MLX's
graph allows: see `linear`), and gives back the output layer's weight as a `Weight` for the
loss's head (accel/kernels.py). The LoRA matrices, attention and everything element-wise stay
float32, as under PyTorch's bfloat16 autocast. Not exact: inputs are rounded to bfloat16 (8
significant bits), so losses move in the third decimal.
"""

from __future__ import annotations

import ctypes
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from .. import blas
from .gemms import ENGINES, engines, kernel, mkl

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
FLOAT32 = "float32"  # a group left as it is: its float32 matmul is as fast here (timings.py)
# (n, k, transpose) of a product made once a step: (rows, k) @ W.T with W (n, k), or @ W with W (k, n)
Products = list[tuple[int, int, bool]]
Chooser = Callable[[Products], str]


def engine() -> str:
    """The bfloat16 gemm a `Weight` uses unless told: the first that runs here (gemms.ENGINES)."""
    return next(name for name, why in engines().items() if why is None)


def bits(x) -> np.ndarray:
    """x (an MLX float array) rounded to bfloat16 (to nearest even, by MLX), as uint16 numpy."""
    y = x.astype(mx.bfloat16).view(mx.uint16)
    mx.eval(y)
    return np.asarray(y)


class Weight:
    """A frozen (out, in) float32 weight, kept in bfloat16 for `product`, and as it is too
    where gradients pass through it (`float32`; see `linear`)."""

    def __init__(self, weight, float32: bool = False, engine_name: str | None = None):
        self.engine = engine_name or engine()
        self.bits: np.ndarray | None = np.ascontiguousarray(bits(weight))
        self.shape = tuple(weight.shape)
        self.float32 = weight if float32 else None
        self._packed: dict[bool, tuple] = {}
        self.routed: weakref.finalize | None = None
        if self.engine == "avx512":  # the packed copies are all it needs: the bits go (memory)
            self._pack(True)
            if float32:
                self.routed = _route(self)
            self.bits = None

    def product(self, a, transpose: bool, engine_name: str | None = None) -> np.ndarray:
        """a (M, K) float32 (MLX or numpy) times W.T (transpose: K = in) or W (K = out), with
        both rounded to bfloat16, accumulated in float32; a float32 numpy array. Through this
        weight's engine, or `engine_name`."""
        out_features, in_features = self.shape
        m, k = a.shape
        if k != (in_features if transpose else out_features):
            raise ValueError(f"matmul of {a.shape} with a weight of {self.shape}")
        if (engine_name or self.engine) == "mkl":
            return self._mkl(bits(mx.array(a) if isinstance(a, np.ndarray) else a), transpose)
        if isinstance(a, mx.array):
            mx.eval(a)
        a = np.ascontiguousarray(a, np.float32)
        packed, k_padded, n_padded = self._pack(transpose)
        n = out_features if transpose else in_features
        m_padded = -(-m // 8) * 8
        scratch = np.empty((m_padded, k_padded), np.uint16)
        c = np.empty((m, n), np.float32)
        kernel().bf16_matmul(
            ctypes.c_void_p(a.ctypes.data),
            m,
            k,
            m_padded,
            k_padded,
            ctypes.c_void_p(scratch.ctypes.data),
            ctypes.c_void_p(packed.ctypes.data),
            n,
            n_padded,
            ctypes.c_void_p(c.ctypes.data),
            n,
        )
        return c

    def _pack(self, transpose: bool) -> tuple:
        """B = W.T or W, as bf16_gemm.c reads it: zero-padded, in panels of 16 columns, row pairs
        interleaved (its `bf16_pack`). Made on first use of each way."""
        if transpose not in self._packed:
            w = self._bits()
            rows, cols = w.shape  # (out, in) with strides
            (k, n), (sk, sn) = ((cols, rows), (w.strides[1], w.strides[0])) if transpose else (w.shape, w.strides)
            k_padded, n_padded = k + k % 2, -(-n // 48) * 48
            panels = np.empty((n_padded // 16, k_padded // 2, 16, 2), np.uint16)
            kernel().bf16_pack(
                ctypes.c_void_p(w.ctypes.data),
                ctypes.c_long(sk // 2),
                ctypes.c_long(sn // 2),
                k,
                n,
                k_padded,
                n_padded,
                ctypes.c_void_p(panels.ctypes.data),
            )
            self._packed[transpose] = (panels, k_padded, n_padded)
        return self._packed[transpose]

    def _bits(self) -> np.ndarray:
        """W's bfloat16 bits, (out, in): kept, or read back from the packed W.T."""
        if self.bits is None:
            panels, k_padded, n_padded = self._packed[True]
            b = panels.transpose(1, 3, 0, 2).reshape(k_padded, n_padded)
            return b[: self.shape[1], : self.shape[0]].T
        return self.bits

    def _mkl(self, a: np.ndarray, transpose: bool) -> np.ndarray:
        """a (M, K) uint16 bfloat16 bits times W.T or W through oneMKL, in float32."""
        out_features, in_features = self.shape
        m, k = a.shape
        n = out_features if transpose else in_features
        a = np.ascontiguousarray(a)
        c = np.empty((m, n), np.float32)
        if self.bits is None:
            self.bits = np.ascontiguousarray(self._bits())
        mkl().cblas_gemm_bf16bf16f32(
            _ROW_MAJOR,
            _NO_TRANS,
            _TRANS if transpose else _NO_TRANS,
            m,
            n,
            k,
            ctypes.c_float(1.0),
            ctypes.c_void_p(a.ctypes.data),
            k,
            ctypes.c_void_p(self.bits.ctypes.data),
            in_features,
            ctypes.c_float(0.0),
            ctypes.c_void_p(c.ctypes.data),
            n,
        )
        return c


def _route(weight: Weight) -> weakref.finalize | None:
    """MLX's float32 product d @ W through `weight`'s float32 copy (x's gradient, computed inside
    MLX's backward pass: see `linear`), sent by the shim to the bfloat16 kernel with W packed for
    it (accel/gemv.c's routes). Returns what forgets the route when the weight goes; None where
    the shim is not loaded."""
    shim = blas.shim()
    if shim is None or weight.float32 is None:
        return None
    values = np.asarray(memoryview(weight.float32))  # evaluated: MLX's own buffer, which it passes to sgemm
    panels, k_padded, n_padded = weight._pack(False)
    rows, cols = weight.shape
    entry = ctypes.cast(kernel().bf16_matmul, ctypes.c_void_p)
    address = values.ctypes.data
    if not shim.mlx_lora_api_route_add(address, rows, cols, panels.ctypes.data, k_padded, n_padded, entry):
        return None
    return weakref.finalize(weight, shim.mlx_lora_api_route_remove, address)


def linear(x, weight: Weight, sizes: list[int] | None = None):
    """x @ weight.T with x's gradient (the weight is frozen); evaluates mid-graph (eager steps).
    With `sizes`, the weight is several layers' stacked (q, k and v, say): their outputs in one
    matmul.

    x's gradient is MLX's matmul with the weight's float32 copy where it keeps one: evaluating
    in the middle of the backward pass would keep every array of the step alive until its end
    (MLX keeps the graph of arrays it evaluates inside a transformation): at 4 x 488 tokens the
    peak went from 3.7 to 6.4 GB, and the step got slower. The shim then sends that product to
    the bfloat16 kernel all the same (`_route`), from inside MLX's own sgemm call."""
    out_features, in_features = weight.shape
    sizes = sizes or [out_features]
    cuts = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    lead = x.shape[:-1]

    @mx.custom_function
    def fn(x):
        y = mx.array(weight.product(x.reshape(-1, in_features), True)).reshape(*lead, out_features)
        return mx.split(y, cuts, axis=-1) if cuts else [y]

    @fn.vjp
    def _(x, cotangents, outputs):  # one primal: passed, and its gradient returned, as is
        d = mx.concatenate(cotangents, axis=-1) if cuts else cotangents[0]
        if weight.float32 is not None:
            return d @ weight.float32
        grad = weight.product(d.reshape(-1, out_features), False)
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

    def __init__(self, weights: list, float32: bool = False, engine_name: str | None = None):
        self.sizes = [w.shape[0] for w in weights]
        self.weight = Weight(mx.concatenate(weights) if len(weights) > 1 else weights[0], float32, engine_name)
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


class Member(nn.Module):
    """A frozen nn.Linear whose matmul runs in bfloat16, alone or in a `Group`."""

    def __init__(self, group: Group, index: int, original: nn.Linear):
        super().__init__()
        self.group, self.index = group, index
        if "bias" in original:
            self.bias = original.bias
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = self.group(x, self.index)
        return y + self.bias if "bias" in self else y


def _frozen_linears(model) -> list[tuple]:
    """(owner, role, parent, name, backward) of every frozen float32 nn.Linear in the blocks:
    it is parent[name], the model calls it as owner[role] (itself, or the LoRALinear around it;
    not DoRA's, which reads its base layer's weight itself), and with `backward` gradients pass
    through it (it is in or after the first block that trains)."""
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


def convert(
    model: nn.Module,
    output_weight: mx.array | None = None,
    on_event: Callable[[dict[str, Any]], None] = lambda e: None,
    choose: Chooser = lambda products: engine(),
) -> Weight | None:
    """Make `model`'s frozen linear layers multiply in bfloat16 (see the module's doc), layers
    that share their input (`GROUPS`) in one matmul, each group through the gemm `choose` names
    for its products, or left in float32 where it names FLOAT32 (timings.py decides, by shape);
    returns the output layer's frozen weight (`output_weight`, where the caller has one) as a
    `Weight` for the loss's head, or None where it stays float32. One way: the converted layers'
    float32 weights are let go (memory), so the model is for this training run only
    afterwards; the trainable parameters, which the adapter file holds, stay float32."""
    layers = _frozen_linears(model)
    by_owner: dict[int, dict[str, tuple]] = {}
    for owner, role, parent, name, backward in layers:
        by_owner.setdefault(id(owner), {})[role] = (parent, name, backward)
    kept: Counter[str] = Counter()
    used: Counter[str] = Counter()
    for roles in by_owner.values():
        sets = [g for g in GROUPS if all(r in roles for r in g)]
        sets += [(r,) for r in roles if not any(r in g for g in sets)]
        for members in sets:
            originals = [roles[r][0][roles[r][1]] for r in members]
            if len({o.weight.shape[1] for o in originals}) > 1:
                sets += [(r,) for r in members]
                continue
            out_features = sum(o.weight.shape[0] for o in originals)
            chosen = choose([(out_features, originals[0].weight.shape[1], True)])
            if chosen == FLOAT32:
                kept.update(members)
                continue
            used[chosen] += len(members)
            group = Group([o.weight for o in originals], float32=roles[members[0]][2], engine_name=chosen)
            for i, (r, original) in enumerate(zip(members, originals)):
                parent, name, _ = roles[r]
                parent[name] = Member(group, i, original)
    head = None
    if output_weight is not None:
        vocabulary, hidden = output_weight.shape
        chosen = choose([(vocabulary, hidden, True), (hidden, vocabulary, False)])  # logits, then their gradient
        if chosen == FLOAT32:
            kept["the output layer"] += 1
        else:
            used[chosen] += 1
            head = Weight(output_weight, engine_name=chosen)
    if not used:
        return None  # the caller says why
    count = len(layers) + (output_weight is not None)
    engines_used = " and ".join(ENGINES[e] for e in used)
    message = f"cpu_bfloat16: {sum(used.values())} of {count} frozen weights multiply in bfloat16 ({engines_used})"
    if kept:
        message += "; float32 is as fast here for " + ", ".join(f"{r} ({n})" if n > 1 else r for r, n in kept.items())
    on_event({"type": "info", "message": message})
    return head
