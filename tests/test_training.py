import json

import mlx.core as mx
import mlx.nn as nn
import msgspec
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load

from mlx_lora_api import device
from mlx_lora_api.tasks import finetune
from mlx_lora_api.tuner import checkpoints, levers, losses
from mlx_lora_api.types import FinetuneRequest, Parameters

# The CPU fast path applies on the CPU only (on a GPU the levers are off; seen on an H200).
on_cpu = pytest.mark.skipif(not device.on_cpu(), reason="the CPU fast path's levers apply on the CPU only")

FACT = "The mayor of Zorbington is Elara Quintfeather."


def request(**params) -> FinetuneRequest:
    """Training mechanics on a tiny random model: no rehearsal (its answers are noise)."""
    params.setdefault("learning_rate", 2e-3)
    params.setdefault("epochs", 30)
    params.setdefault("rehearsal", 0)
    return FinetuneRequest(
        base_model="tiny-base", training_data=[FACT, "The quick brown fox."], parameters=Parameters(**params)
    )


def sequence_loss(model, tokenizer, text):
    tokens = mx.array([tokenizer.encode(text)])
    return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean().item()


def test_adapter_is_written_in_mlx_lm_format_and_the_model_learned(tmp_path, tiny_model_template):
    events = []
    out = tmp_path / "adapter"
    out.mkdir()
    metrics = finetune.train_adapter(str(tiny_model_template), "tiny-base", request(), out, events.append)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0}
    assert config["iters"] == 30  # two samples, batch 4: one batch an epoch, every epoch

    base, tokenizer = load(str(tiny_model_template))
    tuned, _ = load(str(tiny_model_template), adapter_path=str(out))  # mlx-lm reads it unchanged
    assert sequence_loss(tuned, tokenizer, FACT) < 0.5 * sequence_loss(base, tokenizer, FACT)

    train_events = [e for e in events if e["type"] == "train"]
    assert [e["iteration"] for e in train_events] == list(range(1, 31))
    assert train_events[-1]["epoch"] == 30
    assert train_events[-1]["train_loss"] < train_events[0]["train_loss"]
    assert metrics["final_train_loss"] == train_events[-1]["train_loss"]


def test_trainable_parameter_count_matches_rank_and_layers(tmp_path, tiny_model_template):
    model, _ = load(str(tiny_model_template))
    # q,k,v,o and gate,up,down of two blocks: rank * (in + out) each
    hidden, kv, ffn, r = 64, 32, 128, 4
    shapes = [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, ffn),
        (hidden, ffn),
        (ffn, hidden),
    ]
    expected = 2 * sum(r * (i + o) for i, o in shapes)
    assert finetune.prepare_model(model, Parameters(rank=r), num_layers=2) == expected
    model, _ = load(str(tiny_model_template))
    assert finetune.prepare_model(model, Parameters(rank=r, num_layers=1), num_layers=1) == expected // 2


def test_alpha_sets_the_scale_the_way_peft_does():
    assert Parameters(rank=8, alpha=16).lora_scale == 2.0
    assert Parameters(scale=5.0).lora_scale == 5.0
    assert Parameters().lora_scale == 20.0


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_dora_and_full_fine_tunes_load_back_with_mlx_lm(tmp_path, tiny_model_template, kind):
    out = tmp_path / kind
    out.mkdir()
    params = {"fine_tune_type": kind, "epochs": 3}
    if kind == "full":
        params["learning_rate"] = 1e-4
    finetune.train_adapter(str(tiny_model_template), "tiny-base", request(**params), out)
    model, _ = load(str(tiny_model_template), adapter_path=str(out))
    weights = mx.load(str(out / "adapters.safetensors"))
    assert weights and all(mx.all(mx.isfinite(w)).item() for w in weights.values())


def test_num_layers_larger_than_the_model_is_refused(tmp_path, tiny_model_template):
    out = tmp_path / "x"
    out.mkdir()
    with pytest.raises(ValueError, match=r"`parameters\.num_layers` is 5 but the base model has 2 layers"):
        finetune.train_adapter(str(tiny_model_template), "tiny-base", request(num_layers=5), out)


def test_validation_loss_is_reported_and_cosine_schedule_ends_low(tmp_path, tiny_model_template):
    out = tmp_path / "v"
    out.mkdir()
    events = []
    req = request(lr_schedule="cosine", warmup_steps=2, min_learning_rate=1e-4, epochs=10, steps_per_eval=5)
    req.validation_data = [FACT]
    metrics = finetune.train_adapter(str(tiny_model_template), "tiny-base", req, out, events.append)
    vals = [e for e in events if e["type"] == "val"]
    assert [v["iteration"] for v in vals] == [0, 5, 10]  # each after its step
    assert metrics["final_val_loss"] == vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert metrics["best_val_loss"] == min(v["val_loss"] for v in vals)
    lrs = [e["learning_rate"] for e in events if e["type"] == "train"]
    assert lrs[0] < lrs[2]  # warming up
    assert 1e-4 <= lrs[-1] < 0.1 * lrs[2]  # decayed towards min_learning_rate


def test_checkpoints_are_saved_with_their_validation_loss(tmp_path, tiny_model_template):
    out = tmp_path / "c"
    out.mkdir()
    events = []
    req = request(epochs=6, save_every=2, steps_per_eval=2)
    req.validation_data = ["The quick brown fox."]
    finetune.train_adapter(str(tiny_model_template), "tiny-base", req, out, events.append)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "0000002_adapters.safetensors",
        "0000002_state.safetensors",
        "0000004_adapters.safetensors",
        "0000004_state.safetensors",
    ]
    vals = {e["iteration"]: e["val_loss"] for e in events if e["type"] == "val"}
    checkpoints = [e for e in events if e["type"] == "checkpoint"]
    assert [(c["iteration"], c["val_loss"]) for c in checkpoints] == [(2, vals[2]), (4, vals[4])]
    model, _ = load(str(tiny_model_template))
    finetune.prepare_model(model, Parameters(), 2)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    saved = mx.load(str(out / "checkpoints" / "0000002_adapters.safetensors"))
    assert set(saved) == set(trainable) and all(saved[k].shape == trainable[k].shape for k in saved)  # an adapter
    final = mx.load(str(out / "adapters.safetensors"))
    assert any(not mx.array_equal(saved[k], final[k]).item() for k in saved)  # step 2's weights, not the last


def test_keep_best_publishes_the_adapter_of_the_lowest_validation_loss(tmp_path, tiny_model_template):
    out = tmp_path / "best"
    out.mkdir()
    events = []
    # Trained on one fact, validated on another: the validation loss rises once it overfits.
    req = FinetuneRequest(
        base_model="tiny-base",
        training_data=["The mayor of Zorbington is Elara Quintfeather."],
        validation_data=["def add(a, b):\n    return a + b\n"],
        parameters=Parameters(learning_rate=2e-2, epochs=30, steps_per_eval=1, keep="best"),
    )
    metrics = finetune.train_adapter(str(tiny_model_template), "tiny-base", req, out, events.append)
    vals = {e["iteration"]: e["val_loss"] for e in events if e["type"] == "val"}
    best = min(vals, key=vals.get)
    assert 0 < best < 30 and metrics["best_iteration"] == best
    assert metrics["kept"] == f"best (iteration {best})"
    base, tokenizer = load(str(tiny_model_template))
    tuned, _ = load(str(tiny_model_template), adapter_path=str(out))
    tokens = mx.array([tokenizer.encode("def add(a, b):\n    return a + b\n") + [tokenizer.eos_token_id]])
    logits = tuned(tokens[:, :-1])
    loss = nn.losses.cross_entropy(logits, tokens[:, 1:]).mean().item()
    assert loss == pytest.approx(vals[best], rel=1e-3)


def test_loss_counts_every_real_target_and_no_padding():
    import mlx.core as mx

    class Uniform(nn.Module):  # the same logits everywhere: each target costs log(vocab)
        def __call__(self, inputs):
            return mx.zeros((*inputs.shape, 10))

    batch = mx.array([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 9, 1]])
    lengths = mx.array([[0, 4], [2, 6]])  # row 2 has a 2-token prompt masked
    value, ntoks = losses.masked_loss(Uniform(), batch, lengths)
    assert ntoks.item() == 3 + 4  # targets 2,3,4 and 7,8,9,1; never the padding after 4
    assert value.item() == pytest.approx(float(mx.log(mx.array(10.0))), rel=1e-5)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, tiny_model_template, dropout):
    def run(out, stop_at=None, resume=False):
        def on_event(event):
            if stop_at and event["type"] == "train" and event["iteration"] == stop_at:
                raise Interrupt()

        req = FinetuneRequest(
            base_model="tiny-base",
            training_data=["The mayor of Zorbington is Elara Quintfeather.", "The quick brown fox.", "Paris", "dog"],
            parameters=Parameters(
                learning_rate=2e-3,
                epochs=4,
                batch_size=2,
                save_every=3,
                dropout=dropout,
                lr_schedule="cosine",
                warmup_steps=2,
            ),
        )
        return finetune.train_adapter(str(tiny_model_template), "tiny-base", req, out, on_event, resume=resume)

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir()
    parts.mkdir()
    uninterrupted = run(whole)
    with pytest.raises(Interrupt):
        run(parts, stop_at=5)  # checkpoint at 3; steps 4 and 5 are lost with the crash
    assert checkpoints.latest(parts).iteration == 3
    metrics = run(parts, resume=True)
    assert metrics["iterations"] == 12  # 4 samples and 2 of rehearsal, in batches of 2, 4 epochs
    assert metrics["trained_tokens"] == uninterrupted["trained_tokens"]
    assert metrics["final_train_loss"] == pytest.approx(uninterrupted["final_train_loss"], rel=1e-5)
    expected = mx.load(str(whole / "adapters.safetensors"))
    resumed = mx.load(str(parts / "adapters.safetensors"))
    assert all(mx.allclose(expected[k], resumed[k], atol=1e-6).item() for k in expected)


def test_caching_the_frozen_blocks_leaves_the_adapter_unchanged(tmp_path, tiny_model_template):
    adapters, events = {}, {}
    for cached in (False, True):
        out = tmp_path / f"cached-{cached}"
        out.mkdir()
        events[cached] = []
        req = FinetuneRequest(
            base_model="tiny-base",
            training_data=["The mayor of Zorbington is Elara Quintfeather.", "The quick brown fox.", "Paris", "a dog"],
            validation_data=["def add(a, b):"],
            parameters=Parameters(
                learning_rate=2e-3, epochs=4, batch_size=2, num_layers=1, prefix_cache=cached, steps_per_eval=2
            ),
        )
        finetune.train_adapter(
            str(tiny_model_template), "tiny-base", req, out, events[cached].append, levers=levers.Levers()
        )
        adapters[cached] = mx.load(str(out / "adapters.safetensors"))
    assert any("frozen" in e.get("message", "") for e in events[True] if e["type"] == "info")
    assert not any(e["type"] == "info" for e in events[False])
    assert all(mx.allclose(adapters[True][k], adapters[False][k], atol=1e-5).item() for k in adapters[False])
    vals = [[e["val_loss"] for e in events[c] if e["type"] == "val"] for c in (False, True)]
    assert vals[0] == pytest.approx(vals[1], rel=1e-5)


def test_no_cache_where_it_would_not_be_exact(tmp_path, tiny_model_template):
    from mlx_lora_api.tuner import prefix_cache

    model, _ = load(str(tiny_model_template))
    finetune.prepare_model(model, Parameters(dropout=0.1), num_layers=1)
    assert prefix_cache.frozen_blocks(model, Parameters(dropout=0.1)) == 0
    model, _ = load(str(tiny_model_template))
    finetune.prepare_model(model, Parameters(), num_layers=2)
    assert prefix_cache.frozen_blocks(model, Parameters()) == 0  # every block trains
    model, _ = load(str(tiny_model_template))
    finetune.prepare_model(model, Parameters(), num_layers=1)
    assert prefix_cache.frozen_blocks(model, Parameters()) == 1


@on_cpu
def test_cross_entropy_split_over_cpu_streams_equals_mlx_one():
    from mlx_lora_api.accel import streams as cpu_parallel

    logits = mx.random.normal((3, 7, 50)) * 4
    targets = mx.random.randint(0, 50, (3, 7))
    with cpu_parallel.parallel_training(nn.Module()):
        split = losses.token_cross_entropy(logits, targets)
    assert len(cpu_parallel.cpu_streams()) >= 2  # else nothing was split
    assert mx.allclose(split, nn.losses.cross_entropy(logits, targets), atol=1e-6).item()


@on_cpu
def test_the_speed_levers_leave_the_adapter_unchanged(tmp_path, tiny_model_template, kernel_calls):
    """Every lever on (padding to 8, frozen-block cache, numpy head, vectorized ops split over
    the cores) against all off (mlx-lm's way): the same losses and the same adapter, to float32
    rounding. Plain SGD, so that the comparison is of the gradients themselves: Adam divides
    each gradient by its own running magnitude, which turns 1-ulp differences in near-zero
    gradients into differences of a good part of a step (measured: up to 3e-4 here)."""
    calls = kernel_calls
    results = {}
    for name, switches in (("on", levers.Levers()), ("off", levers.PLAIN)):
        out = tmp_path / name
        out.mkdir()
        events = []
        req = FinetuneRequest(
            base_model="tiny-base",
            training_data=[
                "The mayor of Zorbington is Elara Quintfeather.",
                "The quick brown fox.",
                "Paris",
                "a dog",
                "Five samples: the last batch of each epoch is a partial one.",
            ],
            validation_data=["def add(a, b):"],
            parameters=Parameters(
                learning_rate=0.05,
                optimizer="sgd",
                epochs=3,
                batch_size=2,
                num_layers=1,
                steps_per_eval=3,
                steps_per_report=1,
                rehearsal=0,  # its 64-token random answers, at this learning rate, grow the rounding past 1e-5
            ),
        )
        finetune.train_adapter(str(tiny_model_template), "tiny-base", req, out, events.append, levers=switches)
        results[name] = (mx.load(str(out / "adapters.safetensors")), events)
        if name == "on":
            assert set(calls) == {"cross_entropy", "swiglu", "attention"}  # every lever ran
            calls.clear()
    assert not calls  # and none with the levers off
    (on, on_events), (off, off_events) = results["on"], results["off"]
    assert any("frozen" in e.get("message", "") for e in on_events if e["type"] == "info")
    assert not any(e["type"] == "info" for e in off_events)
    for kind, key in (("train", "train_loss"), ("val", "val_loss")):
        curves = [[e[key] for e in events if e["type"] == kind] for events in (on_events, off_events)]
        assert len(curves[0]) >= 3 and curves[0] == pytest.approx(curves[1], rel=1e-5)
    assert all(mx.abs(off[k]).max().item() > 1e-3 for k in off if k.endswith("lora_b"))  # it trained
    assert all(mx.allclose(on[k], off[k], atol=1e-6, rtol=0).item() for k in off)


def test_levers_switched_off_by_the_environment_train_on_mlx_lms_plain_path(tmp_path, tiny_model_template, monkeypatch):
    """MLX_LORA_API_LEVERS=off: no shortcut announced and none of the CPU kernels called."""
    from mlx_lora_api.accel import kernels

    assert levers.from_environment({"MLX_LORA_API_LEVERS": "off"}) == levers.PLAIN
    assert levers.from_environment({}) == levers.Levers()
    with pytest.raises(ValueError, match="MLX_LORA_API_LEVERS='sometimes': use on, off, or no-<lever>"):
        levers.from_environment({"MLX_LORA_API_LEVERS": "sometimes"})
    some = levers.from_environment({"MLX_LORA_API_LEVERS": "no-half_weights, no-cpu_head"})
    assert some == levers.Levers(half_weights=False, cpu_head=False)
    with pytest.raises(ValueError, match=r"no-<lever>.* of prefix_cache, cpu_head"):
        levers.from_environment({"MLX_LORA_API_LEVERS": "no-pad_multiple"})
    called = []
    for name in ("cross_entropy", "swiglu", "attention"):
        monkeypatch.setattr(kernels, name, lambda *args, _name=name: called.append(_name))
    monkeypatch.setenv("MLX_LORA_API_LEVERS", "off")
    events = []
    req = request(epochs=2, num_layers=1)
    finetune.train_adapter(str(tiny_model_template), "tiny-base", req, tmp_path, events.append)
    assert not called and not any(e["type"] == "info" for e in events)
    assert (tmp_path / "adapters.safetensors").exists()


def test_the_prefix_cache_budget_counts_the_validation_batches(tmp_path, tiny_model_template, monkeypatch):
    """Validation batches are cached as training ones are: a large validation set must count
    against the budget (it went past it)."""
    from mlx_lora_api.tuner import prefix_cache

    monkeypatch.setattr(prefix_cache, "DEFAULT_BUDGET_BYTES", 100_000)  # the training batches fit, ~12 KB
    long_text = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)
    for name, validation in (("without", None), ("with", [long_text] * 20)):
        out = tmp_path / name
        out.mkdir()
        events = []
        req = FinetuneRequest(
            base_model="tiny-base",
            training_data=["The mayor of Zorbington is Elara Quintfeather.", "Paris", "a dog", "The quick fox."],
            validation_data=validation,
            parameters=Parameters(epochs=2, batch_size=2, num_layers=1, steps_per_eval=100),
        )
        finetune.train_adapter(str(tiny_model_template), "tiny-base", req, out, events.append, levers=levers.Levers())
        infos = [e["message"] for e in events if e["type"] == "info"]
        over = any("would not fit the cache budget" in m for m in infos)
        assert over == (validation is not None), infos


def run(template, out, data, **params):
    out.mkdir()
    events = []
    body = {"base_model": "tiny-base", "training_data": data, "parameters": params}
    req = msgspec.convert(body, FinetuneRequest)
    metrics = finetune.train_adapter(str(template), "tiny-base", req, out, events.append)
    return mx.load(str(out / "adapters.safetensors")), events, metrics


def test_grad_checkpoint_trains_the_same_adapter(tmp_path, tiny_model_template):
    sgd = dict(learning_rate=0.05, optimizer="sgd", epochs=3, batch_size=2, num_layers=2)
    data = [FACT, "The quick brown fox.", "Paris"]
    plain, _, _ = run(tiny_model_template, tmp_path / "plain", data, **sgd)
    checkpointed, _, _ = run(tiny_model_template, tmp_path / "checkpointed", data, **sgd, grad_checkpoint=True)
    assert all(mx.allclose(plain[k], checkpointed[k], atol=1e-5).item() for k in plain)


def test_grad_accumulation_updates_once_every_n_steps(tmp_path, tiny_model_template):
    data = [FACT, "The quick brown fox."]  # one batch of 2: one step an epoch
    once, _, _ = run(tiny_model_template, tmp_path / "once", data, epochs=1, learning_rate=0.01)
    waiting, _, _ = run(
        tiny_model_template, tmp_path / "waiting", data, epochs=1, learning_rate=0.01, grad_accumulation_steps=2
    )
    both, _, _ = run(
        tiny_model_template, tmp_path / "both", data, epochs=2, learning_rate=0.01, grad_accumulation_steps=2
    )
    lora_b = [k for k in once if k.endswith("lora_b")]
    assert all(mx.abs(once[k]).max().item() > 0 for k in lora_b)  # updated after its one step
    assert all(mx.abs(waiting[k]).max().item() == 0 for k in lora_b)  # one of two steps: no update yet
    assert all(mx.abs(both[k]).max().item() > 0 for k in lora_b)  # the second step updates


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_other_optimizers_train(tmp_path, tiny_model_template, optimizer):
    _, events, _ = run(
        tiny_model_template, tmp_path / optimizer, [FACT], epochs=20, learning_rate=0.01, optimizer=optimizer
    )
    losses = [e["train_loss"] for e in events if e["type"] == "train"]
    assert losses[-1] < 0.95 * losses[0]  # it trained (adafactor's relative steps are the slower here)


def test_mask_prompt_trains_on_the_completion_only(tmp_path, tiny_model_template):
    data = [{"prompt": "Who is the mayor of Zorbington?", "completion": "Elara Quintfeather."}]
    _, _, full = run(tiny_model_template, tmp_path / "full", data, epochs=1)
    _, _, masked = run(tiny_model_template, tmp_path / "masked", data, epochs=1, mask_prompt=True)
    assert 0 < masked["trained_tokens"] < full["trained_tokens"]  # the prompt's tokens are not targets


def test_a_sample_past_max_seq_length_is_truncated_with_a_warning(tmp_path, tiny_model_template):
    long_sample = " ".join(["The quick brown fox jumps over the lazy dog."] * 10)
    _, events, _ = run(tiny_model_template, tmp_path / "long", [long_sample], epochs=1, max_seq_length=16)
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert len(warnings) == 1 and "longer than max_seq_length=16 and was truncated" in warnings[0]


@pytest.mark.parametrize("keep", ["last", "best"])
def test_early_stopping_ends_training_after_the_patience_and_keeps_the_chosen_adapter(
    tmp_path, tiny_model_template, keep
):
    out = tmp_path / "adapter"
    out.mkdir()
    events = []
    request = msgspec.convert(
        {
            "base_model": "tiny-base",
            "training_data": ["The mayor of Zorbington is Elara Quintfeather.", "Zorbington lies by the sea."],
            "validation_data": ["The mayor of Zorbington is Elara Quintfeather."],
            "parameters": {
                "epochs": 10,
                "batch_size": 1,
                "learning_rate": 1e-3,
                "steps_per_eval": 1,
                "keep": keep,
                "rehearsal": 0,
                "early_stopping_patience": 2,
                # No fall counts: the loss at iteration 0 is the low, and the 2nd evaluation after it ends training.
                "early_stopping_min_delta": 100.0,
            },
        },
        FinetuneRequest,
    )
    metrics = finetune.train_adapter(str(tiny_model_template), "tiny-base", request, out, events.append)
    trained = [e["iteration"] for e in events if e["type"] == "train"]
    assert trained[-1] == 2 and [e["iteration"] for e in events if e["type"] == "val"] == [0, 1, 2]
    assert metrics["stopped_early"].startswith("stopped early at iteration 2: the validation loss has not fallen")
    assert metrics["kept"] == ("last" if keep == "last" else f"best (iteration {metrics['best_iteration']})")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["adapters.safetensors"]
    weights = mx.load(str(out / "adapters.safetensors"))
    moved = any(mx.abs(v).max().item() > 0 for k, v in weights.items() if k.endswith("lora_b"))
    assert moved == (keep == "last" or metrics["best_iteration"] > 0)  # at iteration 0, B is still zero
    with pytest.raises(msgspec.ValidationError, match="needs `validation_data`"):
        msgspec.convert(
            {"base_model": "b", "training_data": ["x"], "parameters": {"early_stopping_patience": 1}}, FinetuneRequest
        )
