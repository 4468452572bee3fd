"""GGUF metadata from a model folder's JSON files, for the export (export_gguf.py): the
tokenizer in llama.cpp's terms, and the Ollama Modelfile. No MLX: the service checks a
model's architecture against `GGUF_ARCHITECTURES` before it queues an export."""

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
            "{{ end }}<|im_start|>assistant",
            '"""',
            'PARAMETER stop "<|im_end|>"',
        ]
    return "\n".join(lines) + "\n"
