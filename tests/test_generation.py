import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.utils import load
from servers import running_server
from starlette.testclient import TestClient

from mlx_lora_api import device
from mlx_lora_api.tasks import decoding, finetune
from mlx_lora_api.tasks import generate as generation
from mlx_lora_api.types import FinetuneRequest, Parameters
from mlx_lora_api.web.app import create_app


def train(base, out, text, kind="lora", **parameters):
    out.mkdir()
    request = FinetuneRequest(
        base_model="tiny-base",
        training_data=[text],
        parameters=Parameters(learning_rate=2e-3, epochs=5, fine_tune_type=kind, **parameters),
    )
    finetune.train_adapter(str(base), "tiny-base", request, out)
    return str(out)


def logits(model, tokens):
    return model(mx.array([tokens]))


def test_switching_adapters_reuses_the_loaded_base(tmp_path, tiny_model_template):
    base = str(tiny_model_template)
    first = train(tiny_model_template, tmp_path / "a", "The mayor of Zorbington is Elara Quintfeather.")
    second = train(tiny_model_template, tmp_path / "b", "def add(a, b):\n    return a + b\n", kind="dora")
    cache = generation.ModelCache(budget_bytes=1 << 30)
    tokens = [5, 9, 30, 2]
    expected = {path: logits(load(base, adapter_path=path)[0], tokens) for path in (first, second)}
    plain = logits(load(base)[0], tokens)

    for adapter in (first, second, None, first, second):
        model, _, _ = cache.get(base, adapter)
        want = plain if adapter is None else expected[adapter]
        assert mx.allclose(logits(model, tokens), want, atol=1e-5).item()
    assert cache.loads == 1


def greedy_logits(step, model, prompts: list[list[int]], steps: int) -> list[mx.array]:
    """Each step's logits, decoding `prompts` greedily as one batch (left-padded, as mlx-lm's
    BatchGenerator lays them out) with `step` called as the model is."""
    longest = max(len(p) for p in prompts)
    padding = [longest - len(p) for p in prompts]
    cache = [BatchKVCache(padding) for _ in model.layers]
    tokens = mx.array([[0] * pad + p for pad, p in zip(padding, prompts)])
    out = []
    for _ in range(steps):
        logits = step(tokens, cache=cache)[:, -1, :]
        out.append(logits)
        tokens = mx.argmax(logits, axis=-1, keepdims=True)
    return out


@pytest.mark.skipif(not device.on_cpu(), reason="the compiled step is the CPU's (tasks/decoding.py)")
def test_the_compiled_decoding_step_gives_the_models_own_logits(tmp_path, tiny_model_template, monkeypatch):
    """Bit for bit, alone and as a left-padded batch, with and without a LoRA adapter laid over the
    base; a DoRA adapter, and the levers off, take the model's own step."""
    base = str(tiny_model_template)
    lora = train(tiny_model_template, tmp_path / "a", "The mayor of Zorbington is Elara Quintfeather.")
    dora = train(tiny_model_template, tmp_path / "b", "def add(a, b):\n    return a + b\n", kind="dora")
    monkeypatch.setattr(decoding, "COMPILED_SOFTMAX", 0)  # the tiny model's few scores: compiled too
    cache = generation.ModelCache(budget_bytes=1 << 30)
    for adapter in (None, lora, None):
        model, _, step = cache.get(base, adapter)
        assert isinstance(step, decoding.Decoder)
        reference, _ = load(base, adapter_path=adapter)  # never fused: the model as mlx-lm builds it
        reference.set_dtype(mx.float32)
        if adapter:
            adapted = [m for _, m in model.named_modules() if type(m).__name__ == "LoRALinear"]
            assert adapted and any(mx.any(m.lora_b != 0).item() for m in adapted)
        for prompts in ([[5, 9, 30, 2]], [[5, 9, 30, 2, 7, 7], [3], [11, 12, 13]]):
            want = greedy_logits(reference, reference, prompts, 24)
            got = greedy_logits(step, model, prompts, 24)
            assert all(mx.array_equal(a, b).item() for a, b in zip(want, got)), (adapter, prompts)
    assert cache.loads == 1

    model, _, step = cache.get(base, dora)
    assert step is model  # DoRA's layers are not the plain ones the weights were fused for

    monkeypatch.setenv("MLX_LORA_API_LEVERS", "off")
    model, _, step = generation.ModelCache(budget_bytes=1 << 30).get(base)
    assert step is model


@pytest.mark.skipif(not device.on_cpu(), reason="the compiled step is the CPU's (tasks/decoding.py)")
def test_attention_with_its_softmax_compiled_gives_mlxs_bits(monkeypatch):
    """SmolLM2's heads (9 queries over 3 keys and values) and a model's without grouping, one token a
    row and a prompt's, with no mask, a causal one and a batch's left padding: what
    `mx.fast.scaled_dot_product_attention` gives, bit for bit, through the compiled softmax."""
    calls = []
    compiled = decoding._compiled_softmax
    monkeypatch.setattr(decoding, "_compiled_softmax", lambda *a: calls.append(1) or compiled(*a))
    keys_length = 300
    for rows, heads, kv_heads, length in ((1, 9, 3, 1), (8, 9, 3, 1), (2, 9, 3, 37), (3, 4, 4, 1), (1, 4, 4, 37)):
        queries = mx.random.normal((rows, heads, length, 64))
        keys, values = (mx.random.normal((rows, kv_heads, keys_length, 64)) for _ in range(2))
        padding = mx.array([0, 3, 120, 1, 7, 0, 9, 2][:rows]).reshape(rows, 1, 1, 1)
        masks = [None, mx.arange(keys_length) >= padding]
        if length > 1:
            masks.append("causal")
        for mask in masks:
            want = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=0.125, mask=mask)
            got = decoding._attention(queries, keys, values, None, 0.125, mask)
            assert mx.array_equal(want, got).item(), (rows, heads, kv_heads, length, mask)
    assert len(calls) == 12  # none fell back to mlx-lm's


@pytest.mark.skipif(not device.on_cpu(), reason="the compiled step is the CPU's (tasks/decoding.py)")
def test_the_compiled_attention_lever_switches_it_for_prompts_and_steps(tiny_model_template, monkeypatch):
    monkeypatch.setattr(decoding, "COMPILED_SOFTMAX", 0)
    compiled = decoding._compiled_softmax
    for levers, per_layer in (("on", 24), ("no-compiled_attention", 0)):  # a prompt, then 23 steps
        monkeypatch.setenv("MLX_LORA_API_LEVERS", levers)
        calls = []
        monkeypatch.setattr(decoding, "_compiled_softmax", lambda *a: calls.append(1) or compiled(*a))
        model, _, step = generation.ModelCache(budget_bytes=1 << 30).get(str(tiny_model_template))
        mx.eval(greedy_logits(step, model, [[5, 9, 30, 2], [3]], 24))
        assert len(calls) == per_layer * len(model.layers), levers


@pytest.mark.skipif(not device.on_cpu(), reason="the compiled step is the CPU's (tasks/decoding.py)")
def test_the_compiled_decoding_step_takes_llama_3s_scaled_rotation(tmp_path, tiny_model_template):
    import json

    base = tmp_path / "llama3"
    shutil.copytree(tiny_model_template, base)
    config = json.loads((base / "config.json").read_text())
    config["rope_scaling"] = {  # wavelengths of the tiny model's heads fall in all three of Llama 3's bands
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    (base / "config.json").write_text(json.dumps(config))
    model, _, step = generation.ModelCache(budget_bytes=1 << 30).get(str(base))
    assert isinstance(step, decoding.Decoder) and type(model.layers[0].self_attn.rope).__name__ == "Llama3RoPE"
    reference, _ = load(str(base))
    reference.set_dtype(mx.float32)
    for prompts in ([[5, 9, 30, 2]], [[5, 9, 30, 2, 7, 7], [3], [11, 12, 13]]):
        want = greedy_logits(reference, reference, prompts, 24)
        got = greedy_logits(step, model, prompts, 24)
        assert all(mx.array_equal(a, b).item() for a, b in zip(want, got)), prompts


@pytest.mark.skipif(not device.on_cpu(), reason="the half copies are the CPU's (accel/gemv.c)")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_model_stored_in_half_precision_decodes_from_half_copies_with_its_own_logits(
    tmp_path, tiny_model_template, monkeypatch, dtype
):
    """Every weight of a model stored in float16 (or bfloat16) is one in float32 too, so the products
    that read the half copies compute what float32 computes: the logits bit for bit the model's own,
    alone and as a batch; the copies count in the cache's budget; `no-half_weights` leaves them out."""
    import gc

    from mlx_lm.utils import save_model

    from mlx_lora_api.accel import blas

    base = tmp_path / dtype
    shutil.copytree(tiny_model_template, base)
    stored, _ = load(str(base))
    stored.set_dtype(getattr(mx, dtype))
    if dtype == "bfloat16":  # values below float16's range: the block's q/k/v read a bfloat16 copy
        attention = stored.layers[0].self_attn
        attention.q_proj.weight = attention.q_proj.weight * 1e-6
    save_model(base, stored)
    cache = generation.ModelCache(budget_bytes=1 << 30)
    model, _, step = cache.get(str(base))
    assert isinstance(step, decoding.Decoder)
    half = step.fused.half
    if half is None:
        pytest.skip("no shim, or a CPU without AVX2, FMA and F16C")
    layers = len(model.layers)
    assert half.count == 4 * layers + 1  # q/k/v, o, gate/up, down; the output layer
    # bfloat16 values that are float16 values too are read as float16 (one instruction to widen)
    assert half.kinds == (["float16"] if dtype == "float16" else ["bfloat16", "float16"])
    entry = next(iter(cache._entries.values()))
    assert entry.nbytes == generation._nbytes(model) + half.nbytes
    reference, _ = load(str(base))
    reference.set_dtype(mx.float32)
    before = blas.shadow_products()
    for prompts in ([[5, 9, 30, 2]], [[5, 9, 30, 2, 7, 7], [3], [11, 12, 13]]):
        want = greedy_logits(reference, reference, prompts, 24)
        got = greedy_logits(step, model, prompts, 24)
        assert all(mx.array_equal(a, b).item() for a, b in zip(want, got)), prompts
    assert blas.shadow_products() - before >= 2 * 23 * (4 * layers + 1)  # every step but the prompt's

    shim = blas.shim()
    assert shim.mlx_lora_api_shadows_held() >= half.count
    held = shim.mlx_lora_api_shadows_held()
    entry = model = step = half = None
    cache.budget_bytes = 1
    cache.get(str(tiny_model_template))  # another model, past the budget: the first is unloaded
    gc.collect()
    assert shim.mlx_lora_api_shadows_held() == held - (4 * layers + 1)

    monkeypatch.setenv("MLX_LORA_API_LEVERS", "no-half_weights")
    _, _, step = generation.ModelCache(budget_bytes=1 << 30).get(str(base))
    assert isinstance(step, decoding.Decoder) and step.fused.half is None


def test_the_cache_unloads_the_least_recently_used_model_past_its_budget(tmp_path, tiny_model_template):
    other = tmp_path / "other"

    shutil.copytree(tiny_model_template, other)
    cache = generation.ModelCache(budget_bytes=1)  # room for one model only
    cache.get(str(tiny_model_template))
    cache.get(str(other))
    assert [k[0] for k in cache._entries] == [str(other)]
    cache.get(str(tiny_model_template))
    assert cache.loads == 3


def greedy_args(model_dir, prompt: str) -> dict:
    return dict(
        base_path=str(model_dir),
        adapter_path=None,
        prompt=prompt,
        messages=None,
        max_tokens=30,
        temperature=0.0,
        top_p=1.0,
        seed=None,
    )


def test_stop_strings_end_the_answer(tiny_model_template):
    cache = generation.ModelCache(budget_bytes=1 << 30)
    args = greedy_args(tiny_model_template, "The")
    full = "".join(e["text"] for e in generation.generate(cache, **args) if e["type"] == "text")
    assert len(full) > 4
    stop = full[2:4]
    events = list(generation.generate(cache, **args, stop=[stop]))
    text = "".join(e["text"] for e in events if e["type"] == "text")
    assert text == full[: full.index(stop)] and events[-1]["finish_reason"] == "stop"


def test_a_stop_string_split_across_chunks_is_never_half_sent(tiny_model_template):
    """The stop string's first half ends one streamed chunk, its second half begins the next:
    nothing of it may go out, though the first chunk arrived before the stop was certain."""
    cache = generation.ModelCache(budget_bytes=1 << 30)
    args = greedy_args(tiny_model_template, "Question:")
    chunks = [e["text"] for e in generation.generate(cache, **args) if e["type"] == "text"]
    assert len(chunks) > 2  # this prompt streams in several chunks on the tiny model
    at = next(i for i in range(1, len(chunks)) if chunks[i - 1] and chunks[i])
    stop = chunks[at - 1][-1] + chunks[at][0]
    full = "".join(chunks)
    before = full[: full.index(stop)]
    sent = [e["text"] for e in generation.generate(cache, **args, stop=[stop]) if e["type"] == "text"]
    assert "".join(sent) == before
    cut = [e["text"] for e in generation.generate(cache, **args, stop=[stop + "\x00never"]) if e["type"] == "text"]
    assert "".join(cut) == full  # a partial match that never completes is sent at the end, whole


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        yield client


def test_generate_answers_for_base_adapter_and_fused_models(client):
    body = {"messages": [{"role": "user", "content": "Who is the mayor?"}], "max_tokens": 8, "seed": 1}
    base = client.post("/generate", json={**body, "model": "default"})
    assert base.status_code == 200, base.text
    answer = base.json()
    assert answer["usage"]["completion_tokens"] <= 8 and answer["finish_reason"] in ("stop", "length")
    adapter = client.post(
        "/lora-finetune?wait=true",
        json={
            "base_model": "default",
            "training_data": ["The mayor of Zorbington is Elara Quintfeather."],
            "parameters": {"learning_rate": 0.01, "epochs": 20, "rehearsal": 0},  # rehearsal would keep the answer
        },
    ).json()["model_id"]
    tuned = client.post("/generate", json={**body, "model": adapter}).json()
    assert tuned["text"] != answer["text"]
    fused = client.post("/lora-fuse?wait=true", json={"base_model": "default", "lora_adapter": adapter}).json()
    assert client.post("/generate", json={**body, "model": fused["model_id"]}).json()["text"] == tuned["text"]
    with client.stream("POST", "/generate", json={**body, "model": adapter, "stream": True}) as r:
        lines = list(r.iter_lines())
    texts = [line for line in lines if line.startswith('data: {"text"')]
    assert texts and "event: end" in lines
    # Two adapters and the base asked at once (their batches may share rows): each its own answer.
    other = client.post(
        "/lora-finetune?wait=true",
        json={
            "base_model": "default",
            "training_data": ["Who is the mayor? Nobody knows, said the old sailor."],
            "parameters": {"learning_rate": 0.01, "epochs": 20, "rehearsal": 0, "rank": 4},
        },
    ).json()["model_id"]
    models = ["default", adapter, other] * 3
    alone = {m: client.post("/generate", json={**body, "model": m}).json()["text"] for m in models[:3]}
    assert len(set(alone.values())) == 3
    with ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda m: client.post("/generate", json={**body, "model": m}).json()["text"], models))
    assert together == [alone[m] for m in models]


def test_generate_refuses_bad_requests(client):
    slow = client.post(
        "/lora-finetune", json={"base_model": "default", "training_data": ["x"], "parameters": {"epochs": 10_000}}
    ).json()
    r = client.post("/generate", json={"model": slow["model_id"], "prompt": "hi"})
    assert r.status_code == 409 and "still being made" in r.json()["message"]
    client.post(f"/jobs/{slow['job_id']}/cancel")
    r = client.post("/generate", json={"model": "no-such-model", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["message"].startswith("`model` 'no-such-model'")
    r = client.post(
        "/generate", json={"model": "default", "prompt": "hi", "messages": [{"role": "user", "content": "x"}]}
    )
    assert r.status_code == 422 and "either `prompt` or `messages`" in r.json()["message"]
    r = client.post("/generate", json={"model": "default", "prompt": "hi", "temperature": 5})
    assert r.status_code == 422 and "$.temperature" in r.json()["message"]
    r = client.post("/generate", json={"model": "default", "prompt": ""})
    assert r.status_code == 422 and "$.prompt" in r.json()["message"]


def test_the_openai_client_talks_to_the_service(data_dir, tmp_path):
    openai = pytest.importorskip("openai")
    with running_server(data_dir, tmp_path / "server.log") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        assert "tiny-base" in [m.id for m in client.models.list()]
        messages = [{"role": "user", "content": "Who is the mayor?"}]
        completion = client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=6, temperature=0)
        answer = completion.choices[0].message.content
        assert completion.choices[0].message.role == "assistant" and completion.usage.completion_tokens <= 6
        assert completion.usage.prompt_tokens_details.cached_tokens == 0
        stream = client.chat.completions.create(
            model="tiny-base",
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == answer
        *answering, last = chunks  # as OpenAI's: the usage alone in a last chunk with no choices
        assert last.choices == [] and all(chunk.choices and chunk.usage is None for chunk in answering)
        usage = last.usage  # the same chat: its prompt was kept
        assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
        plain = list(client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=6, stream=True))
        assert plain[-1].choices[0].finish_reason and not any(chunk.usage for chunk in plain)
        with pytest.raises(openai.NotFoundError, match="no-such-model"):
            client.chat.completions.create(model="no-such-model", messages=messages)


def test_generations_past_the_cap_are_turned_away_and_each_place_comes_back(settings):
    """Each waiting generation holds a server thread: past the cap, 429 with Retry-After, so the
    server keeps threads to answer everything else. A place comes back when a stream is read to its
    end, closed, or dropped unread (a client that went away)."""
    from mlx_lora_api.types import GenerateRequest

    settings.max_concurrent_generations = 2
    settings.max_generation_tokens = 64
    ask = {"model": "default", "prompt": "The", "max_tokens": 4}
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        service = client.app.state.service
        held = [service.generate(GenerateRequest(**ask)) for _ in range(2)]  # two places taken, unread
        r = client.post("/generate", json=ask)
        assert r.status_code == 429 and r.headers["retry-after"] == "5" and "2 generations" in r.json()["message"]
        assert (
            client.post(
                "/v1/chat/completions",
                json={"model": "default", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
            ).status_code
            == 429
        )
        assert [e["type"] for e in held[0]][-1] == "end"  # read to its end: its place is back
        assert client.post("/generate", json=ask).status_code == 200
        held.pop().close()  # closed unread
        del held  # and dropped unread
        assert [client.post("/generate", json=ask).status_code for _ in range(3)] == [200, 200, 200]
        r = client.post("/generate", json={**ask, "max_tokens": 65})
        assert r.status_code == 422 and "MLX_LORA_API_MAX_GENERATION_TOKENS" in r.json()["message"]


PROMPTS = ["The", "Question: what is", "def add(a, b):", "The capital of France is Paris. The mayor of"]


def texts(events) -> tuple[str, dict]:
    events = list(events)
    return "".join(e["text"] for e in events if e["type"] == "text"), events[-1]


def test_concurrent_generations_decode_as_one_batch_with_the_answers_they_get_alone(tiny_model_template):
    """Prompts of different lengths (the batch pads them on the left) and a stop string: each
    answer as it is alone, decoded four at a time."""
    cache = generation.ModelCache(budget_bytes=1 << 30)
    alone = [texts(generation.generate(cache, **greedy_args(tiny_model_template, p))) for p in PROMPTS]
    cache.clear_prompts()  # the batch computes every prompt afresh
    batcher = generation.Batcher(cache, max_batch=4)
    for i, prompt in enumerate(PROMPTS):
        batcher.add(i, **greedy_args(tiny_model_template, prompt))
    events: dict[int, list] = {i: [] for i in range(len(PROMPTS))}
    while batcher.busy:
        for request_id, event in batcher.step():
            events[request_id].append(event)
    for i, (text, end) in enumerate(alone):
        got, got_end = texts(events[i])
        assert got == text and len(text) > 4
        assert got_end["completion_tokens"] == end["completion_tokens"]
        assert end["batch"] == 1 and got_end["batch"] == 4


def run(batcher, asks, cancel=None) -> tuple[dict[int, list], list[int]]:
    """Every request's events, and the order in which their first text came."""
    for i, ask in enumerate(asks):
        batcher.add(i, **ask)
    events: dict[int, list] = {i: [] for i in range(len(asks))}
    order = []
    while batcher.busy:
        for request_id, event in batcher.step():
            events[request_id].append(event)
            if event["type"] == "text" and request_id not in order:
                order.append(request_id)
            if cancel is not None and request_id == cancel and len(events[cancel]) == 2:
                batcher.cancel(cancel)  # a client that went away after two chunks
    return events, order


CODE = "def add(a, b):\n    return a + b\n"


def test_different_adapters_of_one_base_share_a_batch_with_the_answers_they_get_alone(
    tmp_path, tiny_model_template, monkeypatch
):
    """LoRAX's batches: two LoRA adapters of different ranks and scales (one adapting the last block only) and
    the base alone, each row adding its own adapter's product; a fourth request joins with an
    adapter laid while the batch runs. Each answer is the one it gets alone, with the adapter laid
    over the base as mlx-lm lays it; and so with the levers off (mlx-lm's model, no compiled step)."""
    first = train(tiny_model_template, tmp_path / "a", "The mayor of Zorbington is Elara Quintfeather.")
    second = train(tiny_model_template, tmp_path / "b", CODE, rank=4, scale=10.0, num_layers=1)  # the last block
    base = greedy_args(tiny_model_template, "The")
    # Rows leave at different steps (max_tokens), so the batch drops rows from between others.
    asks = [
        {**base, "adapter_path": first, "max_tokens": 30},
        {**base, "adapter_path": second, "prompt": "Question: what is", "max_tokens": 12},
        {**base, "prompt": "def add(a, b):", "max_tokens": 24},
        {**base, "adapter_path": second, "prompt": "def add(a, b):", "max_tokens": 30},
    ]
    for levers in ("on", "off"):
        monkeypatch.setenv("MLX_LORA_API_LEVERS", levers)
        cache = generation.ModelCache(budget_bytes=1 << 30)
        alone = [texts(generation.generate(cache, **ask))[0] for ask in asks]
        bare = [texts(generation.generate(cache, **{**ask, "adapter_path": None}))[0] for ask in asks]
        assert [alone[i] != bare[i] for i in range(4)] == [True, True, False, True]  # each adapter matters
        cache.clear_prompts()  # the batch computes every prompt afresh
        batcher = generation.Batcher(cache, max_batch=3)
        events, _ = run(batcher, asks)
        for i, want in enumerate(alone):
            assert texts(events[i])[0] == want, (levers, i)
        assert [events[i][-1]["batch"] for i in range(4)] == [3, 3, 3, 3]  # the fourth took the second's place
        assert cache.loads == 1
        # An adapter that cannot be laid over this base (another base's shapes) fails alone.
        other = tmp_path / f"other-{levers}"
        shutil.copytree(first, other)
        weights = mx.load(str(other / "adapters.safetensors"))
        mx.save_safetensors(
            str(other / "adapters.safetensors"), {k: mx.concatenate([v, v]) for k, v in weights.items()}
        )
        batcher = generation.Batcher(cache, max_batch=3, describe=str)
        events, _ = run(batcher, [asks[0], {**asks[1], "adapter_path": str(other)}, asks[2]])
        assert "do not fit this base's layer" in events[1][0]["message"] and len(events[1]) == 1
        assert texts(events[0])[0] == alone[0] and texts(events[2])[0] == alone[2]


def test_a_prompt_that_begins_as_an_earlier_one_did_reads_only_the_rest(tmp_path, tiny_model_template, monkeypatch):
    """The keys and values of earlier answers are kept (mlx-lm's LRUPromptCache): the same prompt
    again, or the next turn of the conversation, reads only what is new, with the answer computed
    afresh; an adapter's are kept apart from the base's, and forgotten when its weights change."""
    adapter = train(tiny_model_template, tmp_path / "a", "The mayor of Zorbington is Elara Quintfeather.")
    cache = generation.ModelCache(budget_bytes=1 << 30)
    tokenizer = cache.get(str(tiny_model_template))[1]

    def ask(prompt, adapter_path=None, fresh=False):
        if fresh:
            cache.clear_prompts()
        ask = {**greedy_args(tiny_model_template, prompt), "adapter_path": adapter_path, "max_tokens": 12}
        return texts(generation.generate(cache, **ask))

    first, end = ask(PROMPTS[3])
    assert end["cached_tokens"] == 0
    again, end = ask(PROMPTS[3])
    prompt_tokens = len(tokenizer.encode(PROMPTS[3]))
    assert again == first and end["cached_tokens"] == prompt_tokens - 1  # the last one again, for its logits
    turn = PROMPTS[3] + first + " and then"
    _, end = ask(turn)
    assert prompt_tokens <= end["cached_tokens"] < end["prompt_tokens"]
    assert ask(turn)[0] == ask(turn, fresh=True)[0]

    for adapter_path in (adapter, None):  # the adapter's keys and values are its own, and the base's
        with_adapter, end = ask(PROMPTS[3], adapter_path)
        assert end["cached_tokens"] == (0 if adapter_path else prompt_tokens - 1)
        assert (with_adapter != first) == bool(adapter_path)
    os.utime(Path(adapter) / "adapters.safetensors", ns=(1, 1))  # saved anew by a training job
    assert ask(PROMPTS[3], adapter)[1]["cached_tokens"] == 0

    # In one batch, a prompt read from what is kept beside one read afresh: each answer as alone.
    cache.clear_prompts()
    alone = [ask(p)[0] for p in PROMPTS[2:]]
    cache.clear_prompts()
    ask(PROMPTS[2])
    events, _ = run(generation.Batcher(cache, max_batch=4), [greedy_args(tiny_model_template, p) for p in PROMPTS[2:]])
    assert [texts(events[i])[0][: len(alone[i])] for i in range(2)] == alone
    assert [events[i][-1]["cached_tokens"] > 0 for i in range(2)] == [True, False]

    monkeypatch.setenv("MLX_LORA_API_LEVERS", "no-kept_prompts")  # the lever off: nothing read, nothing kept
    cache.clear_prompts()
    assert [ask(PROMPTS[2])[1]["cached_tokens"] for _ in range(2)] == [0, 0]


@pytest.mark.skipif(not device.on_cpu(), reason="the compiled step is the CPU's (tasks/decoding.py)")
def test_adapters_side_by_side_give_each_row_the_logits_of_its_adapter_laid_alone(tmp_path, tiny_model_template):
    """The compiled step and the model's own layers (the prompts) over a mixture of two adapters and
    the base: each row's logits at every step against mlx-lm's model with that row's adapter (or
    none). Equal up to the order in which products add other adapters' zeros (bit for bit here)."""
    base = str(tiny_model_template)
    first = train(tiny_model_template, tmp_path / "a", "The mayor of Zorbington is Elara Quintfeather.")
    second = train(tiny_model_template, tmp_path / "b", CODE, rank=4, scale=10.0, num_layers=1)  # the last block
    model, _, fused, mixture = generation.ModelCache(budget_bytes=1 << 30).mixed(base)
    slots = [mixture.slot(first), mixture.slot(second), None]
    assert slots == [0, 1] + [None] and mixture.slot(first) == 0  # laid once
    step = decoding.decoder(model, fused, mixture)
    assert isinstance(step, decoding.Decoder)
    prompts = [[5, 9, 30, 2, 7, 7], [3], [11, 12, 13]]
    mixture.select(slots)
    got = greedy_logits(step, model, prompts, 24)
    for row, (prompt, adapter) in enumerate(zip(prompts, [first, second, None])):
        reference, _ = load(base, adapter_path=adapter)
        reference.set_dtype(mx.float32)
        want = greedy_logits(reference, reference, [prompt], 24)
        assert all(mx.allclose(a[0], b[row], rtol=0, atol=1e-5).item() for a, b in zip(want, got)), row


def test_an_adapter_that_cannot_be_mixed_waits_for_the_batch_and_a_cancelled_one_leaves_it(
    tmp_path, tiny_model_template
):
    """A DoRA adapter is laid over the base in place: it gets a batch of its own."""
    adapter = train(tiny_model_template, tmp_path / "a", "The mayor of Zorbington is Elara Quintfeather.", kind="dora")
    cache = generation.ModelCache(budget_bytes=1 << 30)
    asks = [
        greedy_args(tiny_model_template, "The"),
        {**greedy_args(tiny_model_template, "The"), "adapter_path": adapter},
        greedy_args(tiny_model_template, "Question: what is"),
        greedy_args(tiny_model_template, "def add(a, b):"),
    ]
    alone = [texts(generation.generate(cache, **ask))[0] for ask in asks]
    assert alone[0] != alone[1]  # the adapter changes the answer
    events, order = run(generation.Batcher(cache, max_batch=4), asks, cancel=3)
    assert order == [0, 1, 2, 3]  # first come, first served: the base's third waits behind the adapter
    for i in range(3):
        assert texts(events[i])[0] == alone[i]
    assert events[0][-1]["batch"] == 1 and events[2][-1]["batch"] == 2  # 2 and 3 decoded together
    assert len(events[3]) == 2 and all(e["type"] == "text" for e in events[3])  # nothing after the cancel


def test_a_request_that_cannot_start_fails_alone(tmp_path, tiny_model_template):
    cache = generation.ModelCache(budget_bytes=1 << 30)
    batcher = generation.Batcher(cache, max_batch=4, describe=str)
    batcher.add(0, **greedy_args(tiny_model_template, "The"))
    batcher.add(1, **{**greedy_args(tiny_model_template, "The"), "base_path": str(tmp_path / "gone")})
    batcher.add(2, **greedy_args(tiny_model_template, ""))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    batcher.add(3, **{**greedy_args(tiny_model_template, "The"), "adapter_path": str(tmp_path / "broken")})
    events: dict[int, list] = {i: [] for i in range(4)}
    while batcher.busy:
        for request_id, event in batcher.step():
            events[request_id].append(event)
    assert events[0][-1]["type"] == "end" and texts(events[0])[0]
    assert events[1] == [{"type": "error", "message": events[1][0]["message"]}] and "gone" in events[1][0]["message"]
    assert events[2] == [{"type": "error", "message": "the prompt is empty once tokenized"}]
    assert len(events[3]) == 1 and "adapter_config.json" in events[3][0]["message"], events[3]


def test_streams_of_concurrent_chats_each_get_their_own_answer(settings):
    """Through the generation process: eight requests at once, each stream gets its own events."""
    from mlx_lora_api.types import GenerateRequest

    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        service = client.app.state.service

        def ask(prompt: str) -> str:
            return service.generate_text(GenerateRequest(model="default", prompt=prompt, max_tokens=40))[0]

        alone = [ask(p) for p in PROMPTS]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, PROMPTS * 2))
        assert together == alone * 2


def test_a_generation_process_that_dies_fails_its_streams_and_the_next_request_starts_another(
    tiny_model_template,
):
    """Killed mid-answer (after its first event): the stream says so, nothing hangs, and the next
    request gets a fresh process."""
    import os
    import signal

    from mlx_lora_api import errors
    from mlx_lora_api.jobs.generation import Generator

    generator = Generator(budget_bytes=1 << 30, max_concurrent=4)
    ask = {**greedy_args(tiny_model_template, "The"), "max_tokens": 1_000_000, "stop": None}
    try:
        stream = generator.stream(ask)
        assert next(stream)["type"] == "text"
        first = generator._process
        assert first is not None and first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(errors.ServiceError, match="generation process stopped unexpectedly"):
            for event in stream:
                assert event["type"] == "text"  # what it had sent before it died, then the error
        events = list(generator.stream({**ask, "max_tokens": 5}))
        assert events[-1]["type"] == "end" and events[-1]["completion_tokens"] == 5
        assert generator._process is not first
    finally:
        generator.stop()
