"""The CPU kernels against MLX's own ops: values and gradients."""

import os
import subprocess
import sys
import tempfile

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu as mlx_swiglu

from mlx_lora_api.accel import blas, elementwise, jit, kernels
from mlx_lora_api.accel.jit import cpu_has as jit_cpu_has


def grads(fn, *args):
    return mx.grad(lambda *a: (fn(*a) * mx.cos(a[0])).sum(), argnums=tuple(range(len(args))))(*args)


def test_swiglu_matches_mlx_with_its_gradients():
    gate, up = mx.random.normal((2, 7, 48)) * 30, mx.random.normal((2, 7, 48))
    assert mx.allclose(kernels.swiglu(gate, up), mlx_swiglu(gate, up), atol=1e-5).item()
    for ours, theirs in zip(grads(kernels.swiglu, gate, up), grads(mlx_swiglu, gate, up)):
        assert mx.allclose(ours, theirs, atol=1e-5).item()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads, kv_length", [(1, 9), (3, 9), (3, 13)])
def test_attention_matches_mlx_fast_sdpa_with_its_gradients(causal, kv_heads, kv_length):
    q, k, v = (
        mx.random.normal((2, 6, 9, 16)),
        mx.random.normal((2, kv_heads, kv_length, 16)),
        mx.random.normal((2, kv_heads, kv_length, 16)),
    )
    mask = "causal" if causal else None

    def reference(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)

    def ours(q, k, v):
        return kernels.attention(q, k, v, 0.25, causal)

    assert mx.allclose(ours(q, k, v), reference(q, k, v), atol=1e-5).item()
    for a, b in zip(grads(ours, q, k, v), grads(reference, q, k, v)):
        assert mx.allclose(a, b, atol=1e-5).item()


@pytest.mark.parametrize("built", [True, False])
def test_the_softmax_kernel_is_a_float64_softmax_to_float32_precision(built, monkeypatch):
    """Rows of attention scores under the causal window (4 queries, the last of 7 keys) and of
    logits with their log-sum-exp; without the library built, numpy computes the same."""
    if not built:
        monkeypatch.setattr(elementwise, "_lib", [None])
    elif elementwise.library() is None:
        pytest.fail(f"the softmax kernel is not built ({elementwise.target().name}): ./scripts/setup builds it")
    rng = np.random.default_rng(0)
    scores = (rng.normal(size=(2, 3, 4, 7)) * 20).astype(np.float32)
    expected = scores.astype(np.float64)
    visible = np.arange(7)[None] <= np.arange(4)[:, None] + 3
    expected = np.exp(
        np.where(visible, expected - np.where(visible, expected, -np.inf).max(-1, keepdims=True), -np.inf)
    )
    expected /= expected.sum(-1, keepdims=True)
    assert elementwise.softmax(scores, 4) is None
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-7)
    assert (scores[..., 0, 4:] == 0).all() and (scores[..., 3, :] > 0).all()
    logits = (rng.normal(size=(5, 3001)) * 30).astype(np.float32)
    exact = logits.astype(np.float64)
    lse = np.log(np.exp(exact - exact.max(-1, keepdims=True)).sum(-1)) + exact.max(-1)
    got = elementwise.softmax(logits, lse=True)
    np.testing.assert_allclose(got, lse, rtol=1e-6)
    np.testing.assert_allclose(logits, np.exp(exact - lse[:, None]), rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("built", [True, False])
def test_the_swiglu_kernel_is_silu_times_x_to_float32_precision(built, monkeypatch):
    if not built:
        monkeypatch.setattr(elementwise, "_lib", [None])
    rng = np.random.default_rng(1)
    gate = np.concatenate([rng.normal(size=40000) * 10, [-100.0, -88.0, 0.0, 88.0, 100.0]]).astype(np.float32)
    x = rng.normal(size=gate.size).astype(np.float32)
    sigmoid = 1 / (1 + np.exp(-gate.astype(np.float64)))
    out, got = elementwise.swiglu(gate, x)
    np.testing.assert_allclose(got, sigmoid, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(out, gate * sigmoid * x, rtol=2e-6, atol=1e-30)
    # the halves of one stacked projection (rows 2 x 45 apart), as training's grouped gate and up give them
    stacked = np.concatenate([gate[-2025:].reshape(5, 9, 45), x[-2025:].reshape(5, 9, 45)], -1)
    halves = stacked[..., :45], stacked[..., 45:]
    assert not halves[0].flags.c_contiguous
    out, got = elementwise.swiglu(*halves)
    expected = 1 / (1 + np.exp(-halves[0].astype(np.float64)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(out, halves[0] * expected * halves[1], rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("chunk", [kernels.CHUNK, 4])
def test_cpu_head_is_mlx_cross_entropy_over_the_counted_rows(chunk, monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", chunk)  # 4: the 9 counted rows' logits in three chunks
    hidden, weight = mx.random.normal((12, 16)), mx.random.normal((50, 16))
    targets = mx.random.randint(0, 50, (12,))
    mask = mx.array([True] * 9 + [False] * 3)

    def reference(h):
        return nn.losses.cross_entropy(h @ weight.T, targets) * mask

    def ours(h):
        return kernels.cross_entropy(h, weight, targets, mask)

    assert mx.allclose(ours(hidden), reference(hidden), atol=1e-5).item()
    assert (ours(hidden)[9:] == 0).all().item()
    scale = mx.arange(12).astype(mx.float32)
    expected = mx.grad(lambda h: (reference(h) * scale).sum())(hidden)
    got = mx.grad(lambda h: (ours(h) * scale).sum())(hidden)
    assert mx.allclose(got, expected, atol=1e-5).item()
    assert (got[9:] == 0).all().item()
    forward_only = kernels.head(weight).forward_only()
    assert mx.array_equal(forward_only(hidden, targets, mask), ours(hidden)).item()
    with pytest.raises(RuntimeError, match="without its gradient"):
        mx.grad(lambda h: forward_only(h, targets, mask).sum())(hidden)
    nothing = mx.zeros((12,), mx.bool_)
    assert (kernels.cross_entropy(hidden, weight, targets, nothing) == 0).all().item()
    assert (mx.grad(lambda h: kernels.cross_entropy(h, weight, targets, nothing).sum())(hidden) == 0).all().item()


def test_cpu_head_only_where_it_computes_the_models_logits(tiny_model_template):
    from mlx_lm.utils import load

    from mlx_lora_api.tasks import finetune
    from mlx_lora_api.tuner.anatomy import output_weight
    from mlx_lora_api.types import Parameters

    model, _ = load(str(tiny_model_template))
    model.set_dtype(mx.float32)
    finetune.prepare_model(model, Parameters(), num_layers=1)
    assert output_weight(model) is not None
    model.model.embed_tokens.unfreeze()
    assert output_weight(model) is None  # the (tied) head's weight trains: no gradient from here
    model, _ = load(str(tiny_model_template))
    nn.quantize(model, group_size=32, bits=4)
    assert output_weight(model) is None


FREED_MEMORY_PROBE = """
import sys
import numpy as np
from mlx_lora_api.accel import blas

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

applied = blas.keep_freed_memory() if sys.argv[1] == "keep" else False
before = rss()
block = np.ones(64 << 20, np.uint8)  # 64 MiB, touched
del block
print(applied, rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_processes_keep_freed_memory_on_glibc():
    """In a process of its own: the setting is process-wide and would stay for the whole test run."""

    def freed(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", FREED_MEMORY_PROBE, mode], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    applied, kept = freed("keep")
    _, given_back = freed("default")
    assert applied == "True"
    assert kept >= 60 << 20  # the freed block stays with the process, for the next step to reuse
    assert given_back < 8 << 20  # glibc's default: a block this large is unmapped when freed


SPIN_PROBE = """
import os, sys
from mlx_lora_api.accel import blas
blas.prepare(decoding=sys.argv[1] == "decoding")
print(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or blas.find_blas() is None, reason="Linux's OpenBLAS")
def test_job_processes_keep_openblas_threads_from_spinning_beside_the_kernels():
    """In processes of their own: OpenBLAS reads it once, when it loads."""

    def timeout(kind: str, **env: str) -> str:
        environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"} | env
        run = subprocess.run([sys.executable, "-c", SPIN_PROBE, kind], capture_output=True, text=True, env=environ)
        return run.stdout.strip()

    assert timeout("job") == "16"
    assert timeout("decoding") == "None"  # the generation process: OpenBLAS's own default
    assert timeout("job", OPENBLAS_THREAD_TIMEOUT="20") == "20"  # the user's setting stands
    assert timeout("job", MLX_LORA_API_LEVERS="off") == "None"  # mlx-lm's plain path


# -- MLX's compiled element-wise kernels built for the CPU (accel/jit.py) -----------------------

COMPILED_SWIGLU = """
import os
import sys
import tempfile
import numpy as np
from mlx_lora_api.accel import blas, jit
blas.prepare()
import mlx.core as mx
from mlx_lm.models.activations import swiglu  # mx.compile'd, as every Llama-like block runs it
rng = np.random.default_rng(0)
gate = mx.array(rng.standard_normal((8, 1536)).astype(np.float32) * 30)  # exp's whole range, both tails
up = mx.array(rng.standard_normal((8, 1536)).astype(np.float32))
half = mx.array(rng.standard_normal((8, 1536)).astype(np.float16))
out = mx.concatenate([swiglu(gate, up), mx.compile(lambda h: (h * h + 1).astype(mx.float32))(half)])
out = mx.concatenate([out, mx.compile(lambda a, b: a * b - b * b + 1)(gate, up)])  # no fma of its own
np.save(sys.argv[1], np.array(out))
print(jit.prepare() is not None, tempfile.gettempdir())
"""

jit_applies = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.uname().machine == "x86_64" and jit_cpu_has()),
    reason="AVX2, FMA and F16C flags are for x86_64 Linux CPUs that have them",
)


def compiled_kernels(tmp_path, name: str, levers: str) -> tuple[str, np.ndarray, bytes]:
    """The probe in a process of its own (the PATH is the process's), with the TMPDIR that every
    probe of the test shares and a cache folder of its own; returns whether the flags applied, the
    outputs, and the compiled SwiGLU it ran (the one library of that kernel in either folder)."""
    tmp, cache = tmp_path / "tmp", tmp_path / name
    tmp.mkdir(exist_ok=True)
    cache.mkdir()
    env = os.environ | {"TMPDIR": str(tmp), "XDG_CACHE_HOME": str(cache), "MLX_LORA_API_LEVERS": levers}
    probe = [sys.executable, "-c", COMPILED_SWIGLU, str(cache / "out.npy")]
    run = subprocess.run(probe, env=env, text=True, capture_output=True)
    assert run.returncode == 0, run.stderr
    applied, temporary = run.stdout.split()
    assert temporary == str(tmp)  # the process's own temporary files stay in its TMPDIR
    built = sorted(cache.glob("**/mlx/*/cpu/lib*Sigmoid*.so")) if applied == "True" else []
    built = built or sorted(tmp.glob("mlx/*/cpu/lib*Sigmoid*.so"))
    assert len(built) == 1, built
    return applied, np.load(cache / "out.npy"), built[0].read_bytes()


@jit_applies
def test_compiled_kernels_are_built_for_the_cpu_and_give_the_same_bits(tmp_path):
    """The flags change which instructions compute, not what: the same bits as MLX's own flags
    give, products and sums rounded one at a time as MLX's uncompiled ops round them, and the libm
    `fmaf` the baseline build calls is gone (the fma is inlined). A kernel that
    MLX's own flags built first, in the shared TMPDIR (any MLX program run before), is not used."""
    plain, theirs, theirs_binary = compiled_kernels(tmp_path, "mlx", f"no-{jit.LEVER}")
    applied, ours, ours_binary = compiled_kernels(tmp_path, "ours", "on")
    assert (applied, plain) == ("True", "False")
    np.testing.assert_array_equal(ours, theirs)  # theirs cannot fuse: baseline x86-64 has no fma
    assert np.isfinite(ours).all() and (ours[:8] != 0).mean() > 0.99
    assert b"fmaf" in theirs_binary and b"fmaf" not in ours_binary
    _, off, _ = compiled_kernels(tmp_path, "off", "off")  # every lever off: MLX's flags too
    np.testing.assert_array_equal(off, theirs)


@jit_applies
def test_a_child_of_a_prepared_process_gets_the_tmpdir_its_parent_was_given(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("PATH", os.environ["PATH"])  # all three restored after the test
    monkeypatch.delenv(jit.GIVEN_TMPDIR, raising=False)
    monkeypatch.delenv(jit.FOLDER_ENV, raising=False)
    monkeypatch.setattr(jit, "_state", {})
    monkeypatch.setattr(tempfile, "tempdir", None)
    folder = jit.prepare()
    assert folder is not None and os.environ["TMPDIR"] == str(folder)  # where MLX looks for kernels
    assert tempfile.gettempdir() == str(tmp_path)
    probe = "import os; from mlx_lora_api.accel import jit; jit.prepare(); print(os.environ['TMPDIR'])"
    for levers in ("on", "off"):
        env = os.environ | {"MLX_LORA_API_LEVERS": levers}
        child = subprocess.run([sys.executable, "-c", probe], env=env, text=True, capture_output=True)
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == (str(folder) if levers == "on" else str(tmp_path))


@jit_applies
def test_a_cache_folder_it_cannot_write_leaves_mlx_its_own_flags(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))  # under a file: not a folder
    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored after the test
    monkeypatch.setattr(jit, "_state", {})
    assert jit.prepare() is None
    assert "file" not in os.environ["PATH"]


def test_the_jit_flags_follow_the_levers_and_the_cpu(tmp_path):
    from mlx_lora_api.tuner import levers

    assert jit.LEVER in levers.SWITCHES and getattr(levers.PLAIN, jit.LEVER) is False
    assert jit.wanted({}) and jit.wanted({"MLX_LORA_API_LEVERS": "no-half_weights"})
    assert not jit.wanted({"MLX_LORA_API_LEVERS": "off"})
    assert not jit.wanted({"MLX_LORA_API_LEVERS": f"no-kept_prompts, no-{jit.LEVER}"})
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c avx512f\n")
    assert jit.cpu_has(cpuinfo=cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx fma f16c\n")  # no AVX2
    assert not jit.cpu_has(cpuinfo=cpuinfo)
    assert not jit.cpu_has(cpuinfo=tmp_path / "missing")


# -- products of 1 to 8 rows through the shim (accel/gemv.c) -----------------------------------

linux_blas = pytest.mark.skipif(
    not sys.platform.startswith("linux") or blas.find_blas() is None, reason="the shim is for Linux's OpenBLAS"
)


@linux_blas
def test_one_row_leaves_a_core_to_the_thread_that_builds_the_next_step():
    """A decoding step of one row: its products on every core but one (on 2 cores, the caller alone);
    a batch's on every core; a small product on the caller alone."""
    shim = blas.shim()
    assert shim is not None
    every = shim.mlx_lora_api_threads(8, 1536, 576)
    if "OMP_NUM_THREADS" not in os.environ:
        assert every == os.cpu_count()
    assert shim.mlx_lora_api_threads(1, 1536, 576) == max(1, every - 1)
    assert shim.mlx_lora_api_threads(1, 64, 128) == 1


@linux_blas
def test_the_shim_computes_every_one_row_product_as_sgemm_does():
    """Called as MLX calls cblas_sgemm: both operands transposed or not, beta 0 over garbage
    (never read) or not (addmm's bias); products with more rows pass through to sgemm."""
    import ctypes

    import numpy as np

    from mlx_lora_api.accel import gemv

    assert blas.describe()["gemv"] == "sgemv"  # ./scripts/setup built it; conftest loaded it
    shim = ctypes.CDLL(str(gemv.target()))  # the same library, already loaded ahead of the BLAS
    rng = np.random.default_rng(0)
    k, n, f = 37, 53, ctypes.c_float

    def ptr(array):
        return array.ctypes.data_as(ctypes.c_void_p)

    before = blas.vector_products()
    for trans_a in (111, 112):
        for trans_b in (111, 112):
            for beta in (0.0, 0.5):
                # A row of k, or a column of a k x 3 matrix (lda 3) when "transposed".
                a_store = rng.standard_normal((1, k) if trans_a == 111 else (k, 3), dtype=np.float32)
                a = a_store if trans_a == 111 else a_store[:, 1:2].T
                a_address = a_store.ctypes.data + (0 if trans_a == 111 else 4)  # column 1: one float in
                lda = k if trans_a == 111 else 3
                b = rng.standard_normal((k, n) if trans_b == 111 else (n, k), dtype=np.float32)
                op_b = b if trans_b == 111 else b.T
                c = np.full((1, n), np.nan if beta == 0 else 2.0, np.float32)
                expected = 1.5 * a @ op_b + (beta * c if beta else 0)
                shim.cblas_sgemm(
                    101, trans_a, trans_b, 1, n, k, f(1.5), ctypes.c_void_p(a_address), lda,
                    ptr(b), b.shape[1], f(beta), ptr(c), n,
                )  # fmt: skip
                np.testing.assert_allclose(c, expected, rtol=1e-5, atol=1e-5)
    assert blas.vector_products() == before + 8
    a, b = rng.standard_normal((2, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    c = np.zeros((2, n), np.float32)
    shim.cblas_sgemm(101, 111, 111, 2, n, k, f(1.0), ptr(a), k, ptr(b), n, f(0.0), ptr(c), n)
    np.testing.assert_allclose(c, a @ b, rtol=1e-5, atol=1e-5)
    assert blas.vector_products() == before + 8  # two rows: not sgemv


@linux_blas
@pytest.mark.parametrize("rows", [2, 5, 6, 7, 8, 9])
def test_a_few_rows_through_a_linear_layers_weight_match_numpy(rows):
    """x @ W.T for 2 to 8 rows (a batch of chats decoding) goes to the shim's own kernel on a CPU
    with AVX2 and FMA, every tile shape and an odd length and width included; 9 rows to sgemm."""
    import ctypes

    import numpy as np

    from mlx_lora_api.accel import gemv

    shim = ctypes.CDLL(str(gemv.target()))
    shim.mlx_lora_api_few_rows_count.restype = ctypes.c_long
    rng = np.random.default_rng(rows)
    k, f = 77, ctypes.c_float  # k: 9 lanes of 8 and 5 more
    for n in (31, 32, 33):  # weight rows in threes, and one or two left over
        x = rng.standard_normal((rows, k + 3), dtype=np.float32)  # lda k + 3: rows with a gap between them
        w = rng.standard_normal((n, k + 1), dtype=np.float32)
        for beta in (0.0, 0.5):
            c = np.full((rows, n + 2), np.nan if beta == 0 else 2.0, np.float32)  # ldc n + 2
            expected = 1.5 * x[:, :k] @ w[:, :k].T + (beta * c[:, :n] if beta else 0)
            before = shim.mlx_lora_api_few_rows_count()
            shim.cblas_sgemm(
                101, 111, 112, rows, n, k, f(1.5), x.ctypes.data_as(ctypes.c_void_p), k + 3,
                w.ctypes.data_as(ctypes.c_void_p), k + 1, f(beta), c.ctypes.data_as(ctypes.c_void_p), n + 2,
            )  # fmt: skip
            np.testing.assert_allclose(c[:, :n], expected, rtol=1e-5, atol=1e-5)
            if beta == 0:
                assert np.isnan(c[:, n:]).all()  # nothing written past each row's n values
            used = shim.mlx_lora_api_few_rows_count() - before
            assert used == (1 if rows <= 8 and shim.mlx_lora_api_few_rows(-1) else 0)
            if shim.mlx_lora_api_wide_tiles(-1):  # AVX-512VL: 8 rows a tile; 4 give the same, bit for bit
                narrow = np.full_like(c, np.nan if beta == 0 else 2.0)
                try:
                    shim.mlx_lora_api_wide_tiles(0)
                    shim.cblas_sgemm(
                        101, 111, 112, rows, n, k, f(1.5), x.ctypes.data_as(ctypes.c_void_p), k + 3,
                        w.ctypes.data_as(ctypes.c_void_p), k + 1, f(beta),
                        narrow.ctypes.data_as(ctypes.c_void_p), n + 2,
                    )  # fmt: skip
                finally:
                    shim.mlx_lora_api_wide_tiles(1)
                np.testing.assert_array_equal(narrow, c)


@linux_blas
@pytest.mark.parametrize("kind", ["float16", "bfloat16"])
def test_products_through_a_weights_half_copy_are_float32_products(kind):
    """A weight whose values are all float16 (or bfloat16) values gets a copy in that type, which
    products of 1 to 8 rows read, through the whole weight or rows of it (a view, as a block's
    q/k/v are views into their stacked weight); the result is float32's product with the same order of
    sums, bit for bit. A weight with other values gets no copy; a copy whose weight changed under it
    is not read; once dropped, none is."""
    import ctypes
    import gc

    import numpy as np

    from mlx_lora_api.accel import gemv

    shim = blas.shim()
    if shim is None or not shim.mlx_lora_api_few_rows(-1):
        pytest.skip("the few-rows kernels need the shim, AVX2 and FMA")
    rng = np.random.default_rng(1)
    k, n, f = 77, 34, ctypes.c_float

    def product(x, w, rows_from=0, rows=None):
        rows = rows or w.shape[0] - rows_from
        c = np.full((x.shape[0], rows), np.nan, np.float32)
        shim.cblas_sgemm(
            101, 111, 112, x.shape[0], rows, k, f(1.0), x.ctypes.data_as(ctypes.c_void_p), k,
            ctypes.c_void_p(w.ctypes.data + 4 * rows_from * k), k, f(0.0), c.ctypes.data_as(ctypes.c_void_p), rows,
        )  # fmt: skip
        return c

    exact = rng.standard_normal((n, k), dtype=np.float32)
    if kind == "float16":
        exact = exact.astype(np.float16).astype(np.float32)
    else:  # bfloat16 values, some under float16's range
        exact = (exact.view(np.uint32) & 0xFFFF0000).view(np.float32) * np.float32(2.0**-20)
    twin = exact.copy()  # the same values, no copy registered: the float32 kernel
    shadows = gemv.Shadows(shim, [exact, rng.standard_normal((n, k), dtype=np.float32)])
    assert (shadows.count, shadows.kinds, shadows.nbytes) == (1, [kind], n * k * 2)
    for rows in range(1, 9):
        x = rng.standard_normal((rows, k), dtype=np.float32)
        for start, width in ((0, n), (5, 20), (33, 1)):
            before = shim.mlx_lora_api_shadow_count()
            got = product(x, exact, start, width)
            assert shim.mlx_lora_api_shadow_count() == before + 1
            np.testing.assert_array_equal(got, product(x, twin, start, width))
            if shim.mlx_lora_api_wide_tiles(-1):  # AVX-512VL's 8-row tiles against AVX2's 4, bit for bit
                try:
                    shim.mlx_lora_api_wide_tiles(0)
                    np.testing.assert_array_equal(got, product(x, exact, start, width))
                finally:
                    shim.mlx_lora_api_wide_tiles(1)
            np.testing.assert_allclose(got, x.astype(np.float64) @ exact[start : start + width].T, rtol=1e-5, atol=1e-5)

    x = rng.standard_normal((3, k), dtype=np.float32)
    exact[0, 0] = 1.0 + twin[0, 0]  # changed under its copy (MLX never does; freed memory reused might)
    before = shim.mlx_lora_api_shadow_count()
    np.testing.assert_allclose(product(x, exact), x @ exact.T, rtol=1e-5, atol=1e-5)
    assert shim.mlx_lora_api_shadow_count() == before
    exact[0, 0] = twin[0, 0]
    del shadows
    gc.collect()
    np.testing.assert_array_equal(product(x, exact), product(x, twin))
    assert shim.mlx_lora_api_shadow_count() == before


GREEDY_DECODE = """
import sys
from mlx_lora_api.accel import blas
blas.prepare()
import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.utils import load
model, _ = load(sys.argv[1])
model.set_dtype(mx.float32)
prompt = mx.array([5, 17, 33, 2, 90, 41, 7])
tokens = [t for t, _ in generate_step(prompt, model, max_tokens=48)]
print(blas.describe()["gemv"], blas.vector_products() or 0, *tokens)
"""


@linux_blas
def test_greedy_decoding_gives_the_same_tokens_through_sgemv(tiny_model_template):
    """The shim changes a product's order of summation only: the same tokens as with the levers
    off (sgemm for every product), in processes of their own (the shim is process-wide)."""
    import os

    def decode(levers: str) -> list[str]:
        env = {**os.environ, "MLX_LORA_API_LEVERS": levers}
        command = [sys.executable, "-c", GREEDY_DECODE, str(tiny_model_template)]
        return subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout.split()

    on, off = decode("on"), decode("off")
    assert on[0] == "sgemv" and int(on[1]) > 48 * 2  # every token's products, in every layer
    assert off[:2] == ["None", "0"]
    assert on[2:] == off[2:] and len(on[2:]) == 48
