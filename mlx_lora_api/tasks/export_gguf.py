"""A model folder to a float16 GGUF file for llama.cpp and Ollama, plus an Ollama Modelfile; a LoRA
adapter to a GGUF LoRA adapter that llama.cpp applies at load time (`--lora`).

The tensors go through mlx-lm's own export pieces (llama.cpp's q/k row order and tensor
names); the file is written by the `gguf` package's `GGUFWriter`, with the metadata of
gguf_metadata.py, so that every value has the type llama.cpp reads (mx.save_gguf wrote the
token types as unsigned integers, which llama.cpp refuses).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np
from mlx_lm.gguf import permute_weights, translate_weight_names

from .checks import GGUF_ARCHITECTURES
from .export_peft import peft_tensors
from .gguf_metadata import ExportError, write_architecture, write_tokenizer
from .modelfile import modelfile


def _tensors(model_dir: Path, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """The weights under llama.cpp's names and row order: norms float32, the rest float16."""
    weights: dict[str, mx.array] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(mx.load(str(path)))
    if not weights:
        raise ExportError(f"no weights (*.safetensors) in {model_dir}")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    tensors = {}
    for key, value in weights.items():
        if key.endswith("self_attn.q_proj.weight"):
            value = permute_weights(value, heads, heads)
        elif key.endswith("self_attn.k_proj.weight"):
            value = permute_weights(value, heads, kv_heads)
        name = translate_weight_names(key)
        tensors[name] = np.asarray(value.astype(mx.float32 if "norm" in name else mx.float16))
    return tensors


def export_gguf(model_dir: Path, out_dir: Path, name: str) -> dict[str, Any]:
    """Write `<name>-f16.gguf` and `Modelfile` into `out_dir`; returns what was written, and why
    the Modelfile has no TEMPLATE (`no_template`, None when it has one)."""
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        raise ExportError(f"GGUF export handles {', '.join(GGUF_ARCHITECTURES)} models, not {model_type!r}")
    if config.get("quantization"):
        raise ExportError("the model is quantized; export its float version (fuse with dequantize) instead")
    tensors = _tensors(model_dir, config)
    gguf_name = f"{name}-f16.gguf"
    writer = gguf.GGUFWriter(str(out_dir / gguf_name), arch="llama")
    write_architecture(writer, config, name)
    tokenizer = write_tokenizer(writer, model_dir)
    for tensor_name, value in tensors.items():
        writer.add_tensor(tensor_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    text, no_template = modelfile(gguf_name, model_dir, tokenizer["adds_bos"])
    (out_dir / "Modelfile").write_text(text)
    return {"gguf": gguf_name, "modelfile": "Modelfile", "tensors": len(tensors), "no_template": no_template}


def export_gguf_lora(adapter_dir: Path, base_dir: Path, out_dir: Path, name: str) -> dict[str, Any]:
    """Write `<name>-lora-f32.gguf` into `out_dir`: the adapter as llama.cpp's convert_lora_to_gguf.py
    writes one (general.type "adapter", adapter.type "lora", adapter.lora.alpha; each target's
    `blk.N.<tensor>.weight.lora_a` and `.lora_b`, PEFT's layouts, with the query's and key's
    lora_b rows in llama.cpp's order, as their base weights are). For the GGUF export of its base."""
    config = json.loads((base_dir / "config.json").read_text())
    if config.get("model_type") not in GGUF_ARCHITECTURES:
        raise ExportError(
            f"GGUF export handles {', '.join(GGUF_ARCHITECTURES)} models, not {config.get('model_type')!r}"
        )
    adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
    if adapter.get("fine_tune_type", "lora") != "lora":
        raise ExportError(f"GGUF LoRA export handles LoRA adapters; this one is {adapter.get('fine_tune_type')}")
    weights: dict[str, mx.array] = dict(mx.load(str(adapter_dir / "adapters.safetensors")))  # a .safetensors file
    tensors, _, _ = peft_tensors(weights)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    gguf_name = f"{name}-lora-f32.gguf"
    writer = gguf.GGUFWriter(str(out_dir / gguf_name), arch="llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    lora = adapter["lora_parameters"]
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora["scale"] * lora["rank"]))
    writer.add_name(name)
    for key, value in sorted(tensors.items()):
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]  # model.layers.N.self_attn.q_proj
        which = "lora_b" if key.endswith("lora_B.weight") else "lora_a"
        if which == "lora_b" and module.endswith("self_attn.q_proj"):
            value = np.asarray(permute_weights(mx.array(value), heads, heads))
        elif which == "lora_b" and module.endswith("self_attn.k_proj"):
            value = np.asarray(permute_weights(mx.array(value), heads, kv_heads))
        writer.add_tensor(f"{translate_weight_names(module + '.weight')}.{which}", np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"gguf": gguf_name, "tensors": len(tensors)}
