import json

import mlx.core as mx
import numpy as np
import pytest
import tiny
from mlx_lm.utils import load

from mlx_lora_api.tasks import import_gguf as gguf_import


def test_unpermute_undoes_llama_cpp_permute():
    weight = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for heads in (1, 2, 3):
        permuted = tiny.llama_cpp_permute(weight, heads)
        assert not np.array_equal(permuted, weight)
        assert np.array_equal(gguf_import.unpermute(permuted, heads), weight)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_import_reproduces_the_model_that_was_exported(tmp_path, tiny_model_template, qtype):
    source = tiny_model_template
    gguf_file = tiny.write_gguf(source, tmp_path / "tiny.gguf", qtype)
    gguf_import.import_gguf(gguf_file, tmp_path / "imported")

    original, original_tok = load(str(source))
    imported, imported_tok = load(str(tmp_path / "imported"))
    imported.set_dtype(mx.float32)

    text = "The mayor of Zorbington is 42 years old."
    tokens = original_tok.encode(text)
    assert imported_tok.encode(text) == tokens
    assert imported_tok.decode(tokens) == text
    a = original(mx.array([tokens]))
    b = imported(mx.array([tokens]))
    # float16 storage (and Q8_0) round the weights a little; a wrong q/k order would not be close.
    tolerance = 2e-2 if qtype == "F32" else 1e-1
    assert mx.max(mx.abs(a - b)).item() < tolerance
    assert mx.array_equal(mx.argmax(a, -1), mx.argmax(b, -1))


def test_import_keeps_chat_template_and_special_tokens(tmp_path, tiny_model_template):
    gguf_file = tiny.write_gguf(tiny_model_template, tmp_path / "tiny.gguf")
    gguf_import.import_gguf(gguf_file, tmp_path / "imported")
    config = json.loads((tmp_path / "imported" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tiny.CHAT_TEMPLATE
    assert config["eos_token"] == "<|im_end|>"
    _, tokenizer = load(str(tmp_path / "imported"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert prompt.count(im_start) == 2  # matched whole, never split into pieces


def test_other_architectures_are_refused_by_name(tmp_path, tiny_model_template):
    gguf_file = tiny.write_gguf(tiny_model_template, tmp_path / "x.gguf", "F32", arch="qwen2")
    with pytest.raises(gguf_import.GGUFImportError, match="architecture 'qwen2' is not supported"):
        gguf_import.import_gguf(gguf_file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(gguf_import.GGUFImportError, match="not a readable GGUF file"):
        gguf_import.import_gguf(bad, tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        gguf_import.import_gguf(tmp_path / "missing.gguf", tmp_path / "out")


@pytest.mark.slow
def test_bundled_model_knows_the_capital_of_france(bundled_data_dir):
    from mlx_lm import generate

    model, tokenizer = load(str(bundled_data_dir / "models" / gguf_import.BUNDLED_NAME))
    model.set_dtype(mx.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    answer = generate(model, tokenizer, prompt, max_tokens=20)
    assert "Paris" in answer
