"""GGUF metadata from a model folder's JSON files, written through the `gguf` package's own
writer and vocabulary helpers (as llama.cpp's converter writes them, each value in the type
llama.cpp reads), for export_gguf.py. No MLX."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

# Llama 3's pre-tokenizer split (tokenizer.json: a Split on this regex, then ByteLevel without its own).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class ExportError(ValueError):
    pass


def pre_tokenizer_name(tokenizer: dict[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (the inverse of
    import_gguf's table): llama.cpp splits text its own way for each name, so a wrong one
    tokenizes differently."""
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (the tokenizer model is "gpt2")
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        if pattern == LLAMA3_SPLIT:
            return "llama-bpe"
    raise ExportError(f"the tokenizer's pre-tokenizer ({', '.join(map(str, kinds))}) has no GGUF equivalent here")


def _bpe_tokens(tokenizer: dict[str, Any]) -> tuple[list[str], list[int]]:
    """Every id's token and type, as llama.cpp's converter makes them: added tokens marked
    special are CONTROL, other added ones USER_DEFINED, ids with no token UNUSED padding."""
    model = tokenizer["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tokenizer.get("added_tokens", [])}
    size = max([*vocab.values(), *added]) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for index, token in added.items():
        tokens[index] = token["content"]
        types[index] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    return tokens, [int(t) for t in types]


def write_tokenizer(writer: gguf.GGUFWriter, model_dir: Path) -> dict[str, Any]:
    """The tokenizer's metadata: byte-level BPE ("gpt2") from tokenizer.json, or SentencePiece
    ("llama") through `gguf.LlamaHfVocab`; special tokens, merges and the chat template through
    `gguf.SpecialVocab`. Returns what a Modelfile needs: whether llama.cpp adds the BOS token."""
    path = model_dir / "tokenizer.json"
    tokenizer = json.loads(path.read_text()) if path.exists() else {}
    model = tokenizer.get("model", {})
    if model.get("type") == "BPE" and (tokenizer.get("decoder") or {}).get("type") == "ByteLevel":
        tokens, types = _bpe_tokens(tokenizer)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        merges = True
    else:
        try:
            vocab = gguf.LlamaHfVocab(model_dir)
        except (FileNotFoundError, TypeError, ValueError) as e:
            raise ExportError(f"the tokenizer of {model_dir.name} has no GGUF equivalent here: {e}") from e
        texts, scores, kinds = zip(*vocab.all_tokens())
        tokens = [t.decode("utf-8", "replace") for t in texts]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(texts))
        writer.add_token_scores(list(scores))
        writer.add_token_types([int(k) for k in kinds])
        merges = False
    special = gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    return {"adds_bos": bool(special.add_special_token.get("bos"))}


def write_architecture(writer: gguf.GGUFWriter, config: dict[str, Any], name: str) -> None:
    """The llama architecture's hyperparameters, from config.json."""
    heads = config["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
