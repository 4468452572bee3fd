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
from typing import Any

import mlx.core as mx
from mlx_lm.gguf import HfVocab, permute_weights, prepare_metadata, translate_weight_names

from .gguf_metadata import GGUF_ARCHITECTURES, ExportError, bpe_metadata, modelfile


def _to_gguf_values(metadata: dict[str, Any]) -> dict[str, Any]:
    converted = {}
    for key, value in metadata.items():
        if isinstance(value, bool):
            converted[key] = mx.array(value, dtype=mx.bool_)
        elif (isinstance(value, list) and value and isinstance(value[0], int)) or isinstance(value, int):
            converted[key] = mx.array(value, dtype=mx.uint32)
        else:
            converted[key] = value
    return converted


def export_gguf(model_dir: Path, out_dir: Path, name: str) -> dict[str, Any]:
    """Write `<name>-f16.gguf` and `Modelfile` into `out_dir`; returns what was written."""
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        raise ExportError(f"GGUF export handles {', '.join(GGUF_ARCHITECTURES)} models, not {model_type!r}")
    if config.get("quantization"):
        raise ExportError("the model is quantized; export its float version (fuse with dequantize) instead")
    weights: dict[str, mx.array] = {}
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


def _arch_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm's architecture metadata without its SentencePiece vocabulary part."""

    class _NoVocab:
        class tokenizer:
            bos_token_id = eos_token_id = unk_token_id = None

        vocab_size = 0

        @staticmethod
        def all_tokens():
            return []

    metadata = prepare_metadata(config, _NoVocab)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        metadata.pop(key, None)
    return metadata
