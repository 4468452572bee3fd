"""cpu_bfloat16: the frozen weights' matmuls in bfloat16 (the AVX-512 BF16 kernel, oneMKL), against float32."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_lora_api.accel import bf16, kernels
from mlx_lora_api.tasks import finetune
from mlx_lora_api.types import FinetuneRequest, Parameters

needs_bf16 = pytest.mark.skipif(bf16.unavailable() is not None, reason=f"bfloat16 matmuls: {bf16.unavailable()}")
SAMPLES = [
    "The mayor of Zorbington is Elara Quintfeather.",
    "The quick brown fox.",
    "Paris",
    "a dog",
    "Five samples: the last batch of each epoch is a partial one.",
]


def close(a, b, rel):
    """Within `rel` of the largest magnitude: bfloat16 keeps 8 significant bits (rel 2^-9 a value)."""
    return mx.abs(a - b).max().item() <= rel * mx.abs(b).max().item()


def test_rounding_is_to_nearest_even():
    x = mx.array([1.0, 1.00390625, 1.01171875, -3.0e-3, 65504.0], mx.float32)
    assert (mx.array(bf16.bits(x)).view(mx.bfloat16) == x.astype(mx.bfloat16)).all().item()


@needs_bf16
def test_linear_and_its_gradient_match_float32_to_bfloat16_precision():
    x, w = mx.random.normal((2, 7, 48)), mx.random.normal((40, 48))
    weight = bf16.Weight(w)
    (y,) = bf16.linear(x, weight)
    assert close(y, x @ w.T, 1e-2)
    cot = mx.random.normal((2, 7, 40))
    got = mx.grad(lambda x: (bf16.linear(x, weight)[0] * cot).sum())(x)
    assert got.shape == x.shape and close(got, cot @ w, 1e-2)
    kept = bf16.Weight(w, float32=True)  # where gradients pass: MLX's float32 matmul, lazily
    assert mx.array_equal(mx.grad(lambda x: (bf16.linear(x, kept)[0] * cot).sum())(x), cot @ w).item()


@needs_bf16
def test_a_group_multiplies_its_members_together_and_computes_afresh_for_another_input():
    x, other = mx.random.normal((2, 7, 48)), mx.random.normal((2, 7, 48))
    ws = [mx.random.normal((40, 48)), mx.random.normal((24, 48)), mx.random.normal((24, 48))]
    group = bf16.Group(ws)
    outputs = [group(x, i) for i in range(3)]
    assert all(close(y, x @ w.T, 1e-2) for y, w in zip(outputs, ws))
    assert group._input is None  # every member took its output: nothing held
    first = group(x, 0)
    assert group(other, 1) is not None and close(group(other, 1), other @ ws[1].T, 1e-2)  # afresh, twice
    assert close(first, x @ ws[0].T, 1e-2)
    cots = [mx.random.normal((2, 7, w.shape[0])) for w in ws]
    got = mx.grad(lambda x: sum((group(x, i) * c).sum() for i, c in enumerate(cots)))(x)
    assert close(got, sum(c @ w for c, w in zip(cots, ws)), 1e-2)
    got = mx.grad(lambda x: (group(x, 2) * cots[2]).sum())(x)  # one member used: the others add nothing
    assert close(got, cots[2] @ ws[2], 1e-2)


@needs_bf16
def test_output_layer_in_bfloat16_matches_float32():
    hidden, w = mx.random.normal((12, 16)), mx.random.normal((50, 16))
    targets, mask = mx.random.randint(0, 50, (12,)), mx.array([True] * 9 + [False] * 3)
    ours = kernels.cross_entropy(hidden, bf16.Weight(w), targets, mask)
    assert close(ours, nn.losses.cross_entropy(hidden @ w.T, targets) * mask, 2e-2) and (ours[9:] == 0).all().item()
    got = mx.grad(lambda h: kernels.cross_entropy(h, bf16.Weight(w), targets, mask).sum())(hidden)
    expected = mx.grad(lambda h: (nn.losses.cross_entropy(h @ w.T, targets) * mask).sum())(hidden)
    assert close(got, expected, 2e-2)


def train(tmp_path, template, name, **params):
    out = tmp_path / name
    out.mkdir()
    events = []
    request = FinetuneRequest(
        base_model="tiny-base",
        training_data=SAMPLES,
        parameters=Parameters(
            learning_rate=0.05, optimizer="sgd", epochs=3, batch_size=2, num_layers=1, steps_per_report=1, **params
        ),
    )
    finetune.train_adapter(str(template), "tiny-base", request, out, events.append)
    losses = [e["train_loss"] for e in events if e["type"] == "train"]
    return mx.load(str(out / "adapters.safetensors")), losses, events


@needs_bf16
def test_training_with_bfloat16_matmuls_follows_the_float32_run(tmp_path, tiny_model_template, monkeypatch):
    monkeypatch.setattr(bf16, "slower", lambda: None)  # the numbers, on any CPU that has the instructions
    exact, exact_losses, _ = train(tmp_path, tiny_model_template, "fp32")
    fast, fast_losses, events = train(tmp_path, tiny_model_template, "bf16", cpu_bfloat16=True)
    # q, k, v, o, gate, up, down of both blocks (the trained one's under LoRA) and the tied output layer
    assert any("15 frozen weights multiply in bfloat16" in e.get("message", "") for e in events)
    assert sum(fast_losses[-3:]) < 0.9 * sum(fast_losses[:3])  # it learned: the last epoch against the first
    assert fast_losses == pytest.approx(exact_losses, rel=2e-2) and fast_losses != exact_losses
    assert all(close(fast[k], exact[k], 5e-2) for k in exact)


def test_where_bfloat16_does_not_apply_training_says_so_and_runs_in_float32(tmp_path, tiny_model_template, monkeypatch):
    exact, exact_losses, _ = train(tmp_path, tiny_model_template, "fp32")
    monkeypatch.setattr(bf16, "unavailable", lambda: "this CPU has neither AMX nor AVX-512 BF16")
    same, losses, events = train(tmp_path, tiny_model_template, "asked", cpu_bfloat16=True)
    assert {
        "type": "info",
        "message": "cpu_bfloat16 does not apply (this CPU has neither AMX nor AVX-512 BF16): training in float32",
    } in events
    assert losses == exact_losses and all(mx.array_equal(same[k], exact[k]).item() for k in exact)


@needs_bf16
def test_where_bfloat16_matmuls_are_not_faster_than_float32_training_stays_in_float32(
    tmp_path, tiny_model_template, monkeypatch
):
    timings = []
    monkeypatch.setattr(bf16.matmul, "_timed", {})
    monkeypatch.setattr(bf16.matmul, "_measure", lambda: timings.append(1) or ({"mkl": 220.0, "avx512": 260.0}, 450.0))
    exact, exact_losses, _ = train(tmp_path, tiny_model_template, "fp32")
    same, losses, events = train(tmp_path, tiny_model_template, "asked", cpu_bfloat16=True)
    assert {
        "type": "info",
        "message": "cpu_bfloat16 does not apply (the service's AVX-512 BF16 kernel multiplies in "
        "bfloat16 at 260 GFLOP/s on this CPU, float32 at 450: not the 1.2x it takes to pay off): training in "
        "float32",
    } in events
    assert losses == exact_losses and all(mx.array_equal(same[k], exact[k]).item() for k in exact)
    assert bf16.slower() is not None and timings == [1]  # timed once a process, not at every run
    monkeypatch.setattr(bf16.matmul, "_timed", {})
    monkeypatch.setattr(bf16.matmul, "_measure", lambda: ({"mkl": 900.0, "avx512": 600.0}, 450.0))
    assert bf16.slower() is None and bf16.engine() == "mkl"


@needs_bf16
def test_the_timing_measures_every_gemm_that_runs_here():
    rates, fp32_gflops = bf16.matmul._measure(64, 128, 96, repeats=1)
    assert fp32_gflops > 0 and rates and all(r > 0 for r in rates.values())
    assert set(rates) == {name for name, why in bf16.engines().items() if why is None}


@pytest.mark.parametrize("engine", ["avx512", "mkl"])
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (7, 5, 17), (13, 33, 50), (37, 1100, 100), (64, 96, 200)])
def test_each_gemm_multiplies_both_ways_exactly_as_bfloat16_inputs_say(engine, m, k, n):
    why = bf16.unavailable() or bf16.engines()[engine]
    if why:
        pytest.skip(why)
    x, w = mx.random.normal((m, k)), mx.random.normal((n, k))
    rounded = [a.astype(mx.bfloat16).astype(mx.float32) for a in (x, w)]
    weight = bf16.Weight(w)
    assert close(mx.array(weight.product(x, True, engine)), rounded[0] @ rounded[1].T, 1e-5)
    d = mx.random.normal((m, n))
    expected = d.astype(mx.bfloat16).astype(mx.float32) @ rounded[1]
    assert close(mx.array(weight.product(np.array(d), False, engine)), expected, 1e-5)  # numpy input too


def test_without_a_compiler_the_kernel_says_why_and_builds_nothing(tmp_path, monkeypatch):
    if " avx512_bf16" not in bf16.gemms._cpuinfo():
        pytest.skip("this CPU has no AVX-512 BF16")
    monkeypatch.setattr(bf16.gemms, "_libs", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    why = bf16.engines()["avx512"]
    assert why.startswith("could not run the C compiler") and "no-such-cc" in why
    assert not list(tmp_path.rglob("*.so*"))  # no half-built kernel left to be loaded later
    monkeypatch.setenv("CC", "cc")
    assert bf16.engines()["avx512"] == why  # not tried again in this process


def test_the_kernel_is_built_once_per_source_compiler_and_flags(tmp_path, monkeypatch):
    """build.py, as ./scripts/setup runs it: any compiler that knows the flags builds it (running
    it needs the CPU instructions); another compiler, or other flags, is another cache entry."""
    import shutil

    from mlx_lora_api.accel.bf16 import build

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    built = build.build()
    assert built.exists() and built == build.target() and built.parent == tmp_path / "mlx-lora-api"
    assert build.build() == built and len(list(built.parent.iterdir())) == 1  # not built twice
    other = tmp_path / "other-cc"
    other.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "other cc 1.0" && exit 0\nexec cc "$@"\n')
    other.chmod(0o755)
    monkeypatch.setenv("CC", str(other))
    assert build.target() != built
    monkeypatch.setattr(build, "FLAGS", (*build.FLAGS, "-DOTHER"))
    monkeypatch.delenv("CC")
    assert build.target() != built


def test_the_kernels_scalar_rounding_is_mlxs_and_keeps_nan(tmp_path):
    """round.h (the kernel's rounding of a row's last values, plain C) against MLX's bfloat16."""
    import shutil
    import struct
    import subprocess

    from mlx_lora_api.accel.bf16 import build

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    program = tmp_path / "round.c"
    program.write_text(
        '#include <stdio.h>\n#include <stdlib.h>\n#include "round.h"\n'
        "int main(int argc, char **argv) {\n"
        "    for (int i = 1; i < argc; i++) {\n"
        "        unsigned u = (unsigned)strtoul(argv[i], 0, 16); float f; memcpy(&f, &u, 4);\n"
        '        printf("%u\\n", round_bf16(f));\n'
        "    }\n    return 0;\n}\n"
    )
    subprocess.run(
        ["cc", "-O2", "-I", str(build.SOURCE.parent), "-o", str(tmp_path / "round"), str(program)], check=True
    )
    values = [1.0, 1.00390625, 1.01171875, -3.0e-3, 65504.0, 3.4e38, -0.0, 1e-40, float("inf"), float("-inf")]
    words = [struct.unpack("<I", struct.pack("<f", v))[0] for v in values]
    nans = [0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF]  # quiet, signalling (would round to inf), negative
    out = subprocess.run(
        [str(tmp_path / "round"), *(f"{w:08x}" for w in words + nans)], capture_output=True, text=True, check=True
    ).stdout.split()
    got = [int(v) for v in out]
    expected = np.asarray(mx.array(values, mx.float32).astype(mx.bfloat16).view(mx.uint16)).tolist()
    assert got[: len(values)] == expected
    for word, rounded in zip(nans, got[len(values) :]):
        assert rounded & 0x7F80 == 0x7F80 and rounded & 0x007F, f"{word:08x} -> {rounded:04x} is not a NaN"
        assert rounded >> 15 == word >> 31  # its sign kept
