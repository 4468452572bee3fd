"""GGUF exports in a real llama.cpp (tests/llama_cpp.py): the file loads, llama.cpp renders the
chat template and tokenizes a chat prompt exactly as the model's own tokenizer does, and its
greedy decoding begins as the service's own does, within float16 rounding."""

from __future__ import annotations

import math

import mlx.core as mx
import msgspec
import pytest
import tiny
from llama_cpp import chat_prompt, greedy, llama_cpp, tokenize
from mlx_lm.utils import load
from ollama import build, render

from mlx_lora_api.tasks import export_gguf, finetune
from mlx_lora_api.tasks import generate as generation
from mlx_lora_api.types import FinetuneRequest

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "It's 12345 o'clock,  isn't it?\n\n  def add(a, b):\n\treturn a + b\n",
    "Question: Answer: system user assistant 0123456789",
    "naïve café — Zorbington's mayor, 2024!",
]


CHATS = [
    MESSAGES,
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And another?"},
    ],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Sky?"},
        {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "Grass?\nBe brief."},
    ],
]


@pytest.fixture(scope="session")
def ollama_template(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ollama"))


def same_prompts_in_ollama(binary, modelfile, tokenizer, bos=""):
    """Go's text/template renders the Modelfile's TEMPLATE for each chat as the chat template does
    (less the BOS token that llama.cpp adds itself)."""
    for chat in CHATS:
        ours = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert render(binary, modelfile, chat) == ours.removeprefix(bos), chat


def export(model_dir, tmp_path, name):
    out = tmp_path / "gguf"
    out.mkdir()
    written = export_gguf.export_gguf(model_dir, out, name)
    return out / written["gguf"], (out / "Modelfile").read_text()


def same_tokens_and_template(client, tokenizer, texts):
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert chat_prompt(client, MESSAGES) == prompt  # the GGUF's own chat template, rendered by llama.cpp
    for text in [prompt, *texts]:
        assert tokenize(client, text) == tokenizer.encode(text, add_special_tokens=False), text


def first_step_probabilities(result) -> dict[int, float]:
    """llama.cpp's top probabilities of the first generated token, by token id."""
    step = result["completion_probabilities"][0]
    if "top_logprobs" in step:
        return {p["id"]: math.exp(p["logprob"]) for p in step["top_logprobs"]}
    return {p["id"]: p["prob"] for p in step["top_probs"]}


def same_next_token_distribution(client, model, tokenizer):
    """A random tiny model's greedy choice can turn on float16 rounding; its probabilities may not."""
    tokens = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    theirs = first_step_probabilities(greedy(client, tokens, 1, probs=5))
    ours = mx.softmax(model(mx.array([tokens]))[0, -1].astype(mx.float32))
    assert len(theirs) == 5 and max(abs(ours[t].item() - p) for t, p in theirs.items()) < 1e-2


@pytest.mark.parametrize("style", ["smollm", "llama3"])
def test_a_tiny_models_export_loads_and_tokenizes_as_its_own_tokenizer(tmp_path, style, ollama_template):
    model_dir = tiny.make_model(tmp_path / f"tiny-{style}", style=style)
    gguf_file, modelfile = export(model_dir, tmp_path, f"tiny-{style}")
    model, tokenizer = load(str(model_dir))
    with llama_cpp(gguf_file, tmp_path / "llama.log") as client:
        specials = tiny.LLAMA3_SPECIAL if style == "llama3" else tiny.SPECIAL
        same_tokens_and_template(client, tokenizer, [*TEXTS, f"{specials[1]}user{specials[2]} hi {specials[-1]}"])
        same_next_token_distribution(client, model, tokenizer)
    eos = "<|eot_id|>" if style == "llama3" else "<|im_end|>"
    assert modelfile.startswith(f"FROM ./tiny-{style}-f16.gguf") and f'PARAMETER stop "{eos}"' in modelfile
    same_prompts_in_ollama(ollama_template, modelfile, tokenizer)


@pytest.mark.slow
def test_the_default_models_export_answers_in_llama_cpp_as_the_service_does(
    bundled_data_dir, tmp_path, ollama_template
):
    model_dir = bundled_data_dir / "models" / "smollm2-135m-instruct"
    gguf_file, modelfile = export(model_dir, tmp_path, "smollm2")
    _, tokenizer = load(str(model_dir))
    cache = generation.ModelCache(budget_bytes=1 << 30)
    ours = generation.generate(cache, str(model_dir), None, None, MESSAGES, 12, 0.0, 1.0, None)
    ours_text = "".join(e["text"] for e in ours if e["type"] == "text")
    with llama_cpp(gguf_file, tmp_path / "llama.log") as client:
        same_tokens_and_template(client, tokenizer, TEXTS)
        theirs = greedy(client, tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True), 12)
    assert "Paris" in ours_text and theirs["content"] == ours_text
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    same_prompts_in_ollama(ollama_template, modelfile, tokenizer)  # its default system prompt included


def lora_adapter(model_dir, tmp_path, **parameters):
    """A LoRA adapter trained hard enough to move the model's next-token distribution."""
    out = tmp_path / "adapter"
    out.mkdir()
    sample = {"messages": [*MESSAGES, {"role": "assistant", "content": "Paris. Paris is in France."}]}
    request = msgspec.convert(
        {
            "base_model": "tiny-base",
            "training_data": [sample] * 4,
            "parameters": {"rehearsal": 0, "retention_check": False, **parameters},
        },
        FinetuneRequest,
    )
    finetune.train_adapter(str(model_dir), "tiny-base", request, out)
    return out


def test_a_gguf_lora_export_is_applied_by_llama_cpp_as_the_service_applies_it(tmp_path, tiny_model_template):
    adapter = lora_adapter(tiny_model_template, tmp_path, learning_rate=1e-2, epochs=10, rank=4, alpha=16)
    gguf_file, _ = export(tiny_model_template, tmp_path, "tiny")
    written = export_gguf.export_gguf_lora(adapter, tiny_model_template, tmp_path, "tiny-adapter")
    assert written["tensors"] == 2 * 7 * 2  # lora_a and lora_b of 7 projections in 2 blocks
    tuned, tokenizer = load(str(tiny_model_template), adapter_path=str(adapter))
    base, _ = load(str(tiny_model_template))
    tokens = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    with llama_cpp(gguf_file, tmp_path / "llama.log", lora=tmp_path / written["gguf"]) as client:
        same_next_token_distribution(client, tuned, tokenizer)
        theirs = first_step_probabilities(greedy(client, tokens, 1, probs=5))
    without = mx.softmax(base(mx.array([tokens]))[0, -1].astype(mx.float32))
    assert max(abs(without[t].item() - p) for t, p in theirs.items()) > 0.05  # the adapter was applied


@pytest.mark.slow
def test_the_default_models_lora_export_answers_in_llama_cpp_as_the_service_does(bundled_data_dir, tmp_path):
    """The base's GGUF with the adapter's, in llama.cpp, against the service's base with the adapter:
    the same greedy tokens."""
    model_dir = bundled_data_dir / "models" / "smollm2-135m-instruct"
    adapter = lora_adapter(model_dir, tmp_path, learning_rate=3e-4, epochs=4, batch_size=4, num_layers=4)
    gguf_file, _ = export(model_dir, tmp_path, "smollm2")
    written = export_gguf.export_gguf_lora(adapter, model_dir, tmp_path, "smollm2-adapter")
    _, tokenizer = load(str(model_dir))
    cache = generation.ModelCache(budget_bytes=1 << 30)
    ours = generation.generate(cache, str(model_dir), str(adapter), None, MESSAGES, 12, 0.0, 1.0, None)
    ours_text = "".join(e["text"] for e in ours if e["type"] == "text")
    plain = generation.generate(cache, str(model_dir), None, None, MESSAGES, 12, 0.0, 1.0, None)
    assert ours_text != "".join(e["text"] for e in plain if e["type"] == "text")  # the adapter changes the answer
    with llama_cpp(gguf_file, tmp_path / "llama.log", lora=tmp_path / written["gguf"]) as client:
        theirs = greedy(client, tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True), 12)
    assert theirs["content"] == ours_text


def test_a_chat_template_that_rewrites_contents_gets_no_ollama_template(tmp_path):
    """Ollama would then build other prompts than the model was trained on: the export leaves the
    TEMPLATE out (Ollama falls back to the GGUF's own) and says why."""
    import json

    from mlx_lora_api.tasks.modelfile import modelfile

    model_dir = tiny.make_model(tmp_path / "tiny-upper")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("message['content']", "message['content'] | upper")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    text, reason = modelfile("tiny-upper-f16.gguf", model_dir, adds_bos=False)
    assert "TEMPLATE" not in text and 'PARAMETER stop "<|im_end|>"' in text
    assert reason == "the chat template is not the same pieces around each message"
