"""A model folder to a float16 GGUF file for llama.cpp and Ollama, plus an Ollama Modelfile.

The tensors go through mlx-lm's own export pieces (llama.cpp's q/k row order and tensor
names, `mx.save_gguf`). Its tokenizer metadata, though, always says SentencePiece
("llama"): right for Llama 2 and Mistral, wrong for byte-level BPE vocabularies such as
SmolLM2's or Llama 3's, which llama.cpp would then tokenize wrongly. For those this module
writes the "gpt2" tokenizer metadata (vocabulary, merges, token types, pre-tokenizer) the
way llama.cpp's own converter does, plus the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

GGUF_ARCHITECTURES = ("llama", "mistral")
CONTROL, NORMAL = 3, 1


class ExportError(ValueError):
    pass


def _pre_tokenizer_name(tokenizer: dict) -> str:
    """llama.cpp's name for the pre-tokenizer (the inverse of gguf_import's table)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt2"
    raise ExportError(f"the tokenizer's pre-tokenizer ({', '.join(map(str, kinds))}) has no GGUF equivalent here")


def bpe_metadata(model_dir: Path) -> dict | None:
    """GGUF tokenizer metadata for a byte-level BPE tokenizer.json; None for other kinds."""
    path = model_dir / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or (tokenizer.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    vocab = dict(model["vocab"])
    special = set()
    for added in tokenizer.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, index in vocab.items():
        tokens[index] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.exists() else {}
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer_name(tokenizer),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [CONTROL if i in special else NORMAL for i in range(size)],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(tok_config.get("add_bos_token", False)),
    }
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        token = tok_config.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if token in vocab:
            metadata[f"tokenizer.ggml.{key}_token_id"] = vocab[token]
    template = tok_config.get("chat_template")
    if not template and (model_dir / "chat_template.jinja").exists():
        template = (model_dir / "chat_template.jinja").read_text()
    if template:
        metadata["tokenizer.chat_template"] = template
    return metadata


def _to_gguf_values(metadata: dict) -> dict:
    import mlx.core as mx

    converted = {}
    for key, value in metadata.items():
        if isinstance(value, bool):
            converted[key] = mx.array(value, dtype=mx.bool_)
        elif isinstance(value, list) and value and isinstance(value[0], int):
            converted[key] = mx.array(value, dtype=mx.uint32)
        elif isinstance(value, int):
            converted[key] = mx.array(value, dtype=mx.uint32)
        else:
            converted[key] = value
    return converted


def modelfile(gguf_name: str, metadata: dict) -> str:
    """An Ollama Modelfile; a ChatML template is spelled out, others are left to Ollama."""
    lines = [f"FROM ./{gguf_name}"]
    template = metadata.get("tokenizer.chat_template", "")
    if "<|im_start|>" in template:
        lines += [
            'TEMPLATE """{{- if .System }}<|im_start|>system',
            "{{ .System }}<|im_end|>",
            "{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}",
            "{{ .Content }}<|im_end|>",
            '{{ end }}<|im_start|>assistant',
            '"""',
            'PARAMETER stop "<|im_end|>"',
        ]
    return "\n".join(lines) + "\n"


def export_gguf(model_dir: Path, out_dir: Path, name: str) -> dict:
    """Write `<name>-f16.gguf` and `Modelfile` into `out_dir`; returns what was written."""
    import mlx.core as mx
    from mlx_lm.gguf import HfVocab, permute_weights, prepare_metadata, translate_weight_names

    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        raise ExportError(f"GGUF export handles {', '.join(GGUF_ARCHITECTURES)} models, not {model_type!r}")
    if config.get("quantization"):
        raise ExportError("the model is quantized; export its float version (fuse with dequantize) instead")
    weights = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(mx.load(str(path)))
    if not weights:
        raise ExportError(f"no weights (*.safetensors) in {model_dir}")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    tensors = {}
    for key, value in weights.items():
        if key.endswith("self_attn.q_proj.weight"):
            value = permute_weights(value, heads, heads)
        elif key.endswith("self_attn.k_proj.weight"):
            value = permute_weights(value, heads, kv_heads)
        name_in_gguf = translate_weight_names(key)
        tensors[name_in_gguf] = value.astype(mx.float32 if "norm" in name_in_gguf else mx.float16)

    tokenizer_metadata = bpe_metadata(model_dir)
    vocab = None if tokenizer_metadata else HfVocab.load(model_dir)
    metadata = prepare_metadata(config, vocab) if vocab else _arch_metadata(config)
    if tokenizer_metadata:
        metadata.update(tokenizer_metadata)
    if head_dim := config.get("head_dim"):
        metadata["llama.rope.dimension_count"] = head_dim
    metadata["general.name"] = name
    metadata["general.file_type"] = 1  # mostly float16
    gguf_name = f"{name}-f16.gguf"
    mx.save_gguf(str(out_dir / gguf_name), tensors, _to_gguf_values(metadata))
    (out_dir / "Modelfile").write_text(modelfile(gguf_name, metadata))
    return {"gguf": gguf_name, "modelfile": "Modelfile", "tensors": len(tensors)}


def _arch_metadata(config: dict) -> dict:
    """mlx-lm's architecture metadata without its SentencePiece vocabulary part."""

    class _NoVocab:
        class tokenizer:
            bos_token_id = eos_token_id = unk_token_id = None

        vocab_size = 0

        @staticmethod
        def all_tokens():
            return []

    from mlx_lm.gguf import prepare_metadata

    metadata = prepare_metadata(config, _NoVocab)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        metadata.pop(key, None)
    return metadata
