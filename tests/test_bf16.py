"""cpu_bfloat16: the frozen weights' matmuls in bfloat16 (the AVX-512 BF16 kernel, oneMKL), against float32."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_lora_api.accel import bf16, blas, kernels
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


@needs_bf16
def test_where_gradients_pass_mlx_s_float32_product_goes_to_the_bfloat16_kernel():
    """A weight that keeps its float32 copy (gradients pass through it): x's gradient is MLX's
    lazy matmul with it, which the shim sends to the bfloat16 kernel (accel/gemv.c's routes)."""
    shim = blas.shim()
    if shim is None:
        pytest.skip("the matrix-vector shim is not built")
    x, w, cot = mx.random.normal((2, 7, 48)), mx.random.normal((40, 48)), mx.random.normal((2, 7, 40))
    kept = bf16.Weight(w, float32=True)
    assert shim.mlx_lora_api_routes_held() >= 1
    before = shim.mlx_lora_api_routed_count()
    got = mx.grad(lambda x: (bf16.linear(x, kept)[0] * cot).sum())(x)
    mx.eval(got)
    assert shim.mlx_lora_api_routed_count() == before + 1
    rounded = cot.astype(mx.bfloat16).astype(mx.float32) @ w.astype(mx.bfloat16).astype(mx.float32)
    assert close(got, rounded, 1e-5)  # bfloat16 inputs, float32 sums: only the order of the sums differs
    assert not close(got, cot @ mx.array(np.array(w)), 1e-5)  # a copy of w: not routed, float32's product
    few = mx.random.normal((8, 40))  # a few rows (decoding's) and a transposed weight: never routed
    mx.eval(few @ w, x @ w.T)
    assert shim.mlx_lora_api_routed_count() == before + 1
    held = shim.mlx_lora_api_routes_held()
    assert kept.routed is not None
    kept.routed()  # what runs when the weight goes: the route is forgotten
    assert shim.mlx_lora_api_routes_held() == held - 1
    mx.eval(cot @ w)
    assert shim.mlx_lora_api_routed_count() == before + 1


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
@pytest.mark.parametrize("chunk", [kernels.CHUNK, 4])
def test_output_layer_in_bfloat16_matches_float32(chunk, monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", chunk)  # 4: the 9 counted rows' logits in three chunks
    hidden, w = mx.random.normal((12, 16)), mx.random.normal((50, 16))
    targets, mask = mx.random.randint(0, 50, (12,)), mx.array([True] * 9 + [False] * 3)
    weight = bf16.Weight(w)
    ours = kernels.cross_entropy(hidden, weight, targets, mask)
    assert close(ours, nn.losses.cross_entropy(hidden @ w.T, targets) * mask, 2e-2) and (ours[9:] == 0).all().item()
    got = mx.grad(lambda h: kernels.cross_entropy(h, weight, targets, mask).sum())(hidden)
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
            learning_rate=0.05,
            optimizer="sgd",
            epochs=3,
            batch_size=2,
            num_layers=1,
            steps_per_report=1,
            rehearsal=0,  # the five samples alone: their losses fall epoch after epoch
            **params,
        ),
    )
    finetune.train_adapter(str(template), "tiny-base", request, out, events.append)
    losses = [e["train_loss"] for e in events if e["type"] == "train"]
    return mx.load(str(out / "adapters.safetensors")), losses, events


def timed(tmp_path, monkeypatch, pays=lambda n, k, transpose: True):
    """Timings kept in tmp_path, each shape's from `pays` (bfloat16 twice as fast, or half as fast)
    rather than measured: the same decisions on any CPU that has the instructions. Returns the
    shapes asked for."""
    asked = []

    def measure(m, n, k, transpose):
        asked.append((m, n, k, transpose))
        return {"float32": 2.0, "avx512": 1.0 if pays(n, k, transpose) else 4.0}

    monkeypatch.setattr(bf16.timings, "measure_product", measure)
    monkeypatch.setattr(bf16, "default_path", lambda: tmp_path / "timings.json")
    return asked


@needs_bf16
def test_training_with_bfloat16_matmuls_follows_the_float32_run(tmp_path, tiny_model_template, monkeypatch):
    timed(tmp_path, monkeypatch)
    exact, exact_losses, _ = train(tmp_path, tiny_model_template, "fp32")
    fast, fast_losses, events = train(tmp_path, tiny_model_template, "bf16", cpu_bfloat16=True)
    # q, k, v, o, gate, up, down of both blocks (the trained one's under LoRA) and the tied output layer
    assert any("15 of 15 frozen weights multiply in bfloat16" in e.get("message", "") for e in events)
    assert sum(fast_losses[-3:]) < 0.9 * sum(fast_losses[:3])  # it learned: the last epoch against the first
    assert fast_losses == pytest.approx(exact_losses, rel=2e-2) and fast_losses != exact_losses
    assert all(close(fast[k], exact[k], 5e-2) for k in exact)


@needs_bf16
def test_each_layer_group_multiplies_in_bfloat16_only_where_its_shapes_are_faster_so(
    tmp_path, tiny_model_template, monkeypatch
):
    """The tiny model's shapes (n, k): q, k and v (128, 64), o (64, 64), gate and up (256, 64),
    down (64, 128), the output layer (384, 64) and its gradient (64, 384)."""
    asked = timed(tmp_path, monkeypatch, pays=lambda n, k, transpose: max(n, k) >= 128 and n != 128)
    exact, exact_losses, _ = train(tmp_path, tiny_model_template, "fp32")
    mixed, losses, events = train(tmp_path, tiny_model_template, "mixed", cpu_bfloat16=True)
    messages = [e["message"] for e in events if e["type"] == "info"]
    converted = next(m for m in messages if "frozen weights multiply in bfloat16" in m)
    # down, gate and up, the output layer (both ways); not q, k and v, o
    assert converted.startswith("cpu_bfloat16: 7 of 15 frozen weights multiply in bfloat16 (the service's AVX-512")
    kept = converted.split("; float32 is as fast here for ")[1].split(", ")
    assert sorted(kept) == ["k_proj (2)", "o_proj (2)", "q_proj (2)", "v_proj (2)"]
    # Timed once per shape, at the job's rows a step (2 samples of at most 16 tokens: the 64-row bucket)
    assert sorted({(n, k, t) for _, n, k, t in asked}) == [
        (64, 64, True),
        (64, 128, True),
        (64, 384, False),
        (128, 64, True),
        (256, 64, True),
        (384, 64, True),
    ]
    assert {m for m, *_ in asked} == {64} and len(asked) == 6
    assert "cpu_bfloat16: timed 6 matmul shapes on this CPU, once" in messages
    assert losses != exact_losses and losses == pytest.approx(exact_losses, rel=2e-2)
    # The next job reads the figures kept for this CPU: nothing timed again, the same choice.
    _, again, events = train(tmp_path, tiny_model_template, "again", cpu_bfloat16=True)
    assert len(asked) == 6 and again == losses
    assert not any("timed" in e.get("message", "") for e in events)
    stored = json.loads((tmp_path / "timings.json").read_text())
    assert stored["cpu"]["cores"] >= 1 and len(stored["seconds"]) == 6


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
def test_where_no_matmul_is_faster_in_bfloat16_training_stays_in_float32(tmp_path, tiny_model_template, monkeypatch):
    timed(tmp_path, monkeypatch, pays=lambda n, k, transpose: False)
    exact, exact_losses, _ = train(tmp_path, tiny_model_template, "fp32")
    same, losses, events = train(tmp_path, tiny_model_template, "asked", cpu_bfloat16=True)
    assert {
        "type": "info",
        "message": "cpu_bfloat16 does not apply (no matmul of this model is 1.1x faster in bfloat16 on this CPU: "
        "at best 0.50x): training in float32",
    } in events
    assert not any("frozen weights multiply" in e.get("message", "") for e in events)
    assert losses == exact_losses and all(mx.array_equal(same[k], exact[k]).item() for k in exact)


def test_timings_are_kept_per_cpu_and_an_unreadable_file_is_timed_again(tmp_path):
    from collections import Counter

    calls = []
    path = tmp_path / "t.json"
    path.write_text("{not json")
    timings = bf16.Timings(path, measure=lambda m, n, k, t: calls.append(m) or {"float32": 3.0, "avx512": 1.0})
    engine, float32, fastest = timings.choose([(2048, 2048, True)], Counter({700: 3, 40: 1}))
    # 700 rows: the 1024 bucket would be over 8 GFLOP a call, so 512 is timed and scaled by rows
    assert calls == [512, 64] and engine == "avx512"
    assert float32 == pytest.approx(3 * 3.0 * 700 / 512 + 3.0 * 40 / 64) and fastest == pytest.approx(float32 / 3)
    assert json.loads(path.read_text())["version"] == bf16.timings.VERSION
    again = bf16.Timings(path, measure=lambda *a: pytest.fail("timed again"))
    assert again.choose([(2048, 2048, True)], Counter({700: 3, 40: 1}))[0] == "avx512"
    assert bf16.default_path().parent == bf16.timings.native.cache_folder()
    assert bf16.default_path().name.startswith("bf16-timings-")


@needs_bf16
def test_the_timing_measures_every_gemm_that_runs_here():
    seconds = bf16.timings.measure_product(64, 128, 96, True, repeats=1)
    assert set(seconds) == {"float32"} | {name for name, why in bf16.engines().items() if why is None}
    assert all(s > 0 for s in seconds.values())
    assert set(bf16.timings.measure_product(64, 128, 96, False, repeats=1)) == set(seconds)


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
