"""Text generation with a base, base plus adapter, or fused model (in the generation process:
jobs/generation.py).

Loaded bases are cached, least recently used first out, within a memory budget. An adapter
is laid over its cached base in place (LoRA/DoRA layers wrap the base's own linear layers),
so switching between adapters of one base never reloads the base weights.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import TextStateMachine, stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import load

from .. import device
from . import checks

log = logging.getLogger("mlx_lora_api")


class _Entry:
    def __init__(self, model, tokenizer, nbytes: int):
        self.model = model
        self.tokenizer = tokenizer
        self.nbytes = nbytes
        self.adapter: str | None = None


def _nbytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _strip_adapter(model) -> None:
    """Put back the base layers that LoRA/DoRA layers wrap."""
    restored = [
        (name, getattr(module, "linear", None) or module.embedding)
        for name, module in model.named_modules()
        if hasattr(module, "lora_a")
    ]
    if restored:
        model.update_modules(tree_unflatten(restored))


def _is_full_fine_tune(adapter: str) -> bool:
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return config.get("fine_tune_type", "lora") == "full"


class ModelCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[str, str | None], _Entry] = OrderedDict()
        self.loads = 0  # how many times weights were read from disk (tests and logs)

    def get(self, base_path: str, adapter_path: str | None = None):
        # A full fine-tune overwrites base weights, so it gets an entry of its own.
        key = (base_path, adapter_path if adapter_path and _is_full_fine_tune(adapter_path) else None)
        entry = self._entries.get(key)
        if entry is None:
            checks.check_model_folder(Path(base_path))
            model, tokenizer = load(base_path)
            device.cast_for_compute(model)
            self.loads += 1
            entry = _Entry(model, tokenizer, _nbytes(model))
            self._entries[key] = entry
            self._evict(keep=key)
        self._entries.move_to_end(key)
        if entry.adapter != adapter_path:
            _strip_adapter(entry.model)
            if adapter_path:
                checks.check_adapter_folder(Path(adapter_path))
                load_adapters(entry.model, adapter_path)
                device.cast_for_compute(entry.model)
            entry.adapter = adapter_path
        entry.model.eval()
        return entry.model, entry.tokenizer

    def _evict(self, keep) -> None:
        while sum(e.nbytes for e in self._entries.values()) > self.budget_bytes and len(self._entries) > 1:
            key = next(k for k in self._entries if k != keep)
            log.info("generation cache: unloading %s", key[0])
            del self._entries[key]
        mx.clear_cache()


def generate(
    cache: ModelCache,
    base_path: str,
    adapter_path: str | None,
    prompt: str | None,
    messages: list[dict] | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stop: list[str] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[dict[str, Any]]:
    """Yields {"type": "text", "text"} chunks, then {"type": "end", "finish_reason", usage...}."""
    model, tokenizer = cache.get(base_path, adapter_path)
    if messages is not None:
        tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        tokens = tokenizer.encode(prompt)
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0)
    started = time.perf_counter()
    finish, last = "length", None
    # mlx-lm's own matcher of stop strings on the decoded text: text that may begin a stop
    # string is held back until it is known not to, so no part of one is ever sent.
    stops = TextStateMachine({"normal": [(s, None) for s in stop]}) if stop else None
    state = stops.make_state() if stops else None
    for response in stream_generate(model, tokenizer, tokens, max_tokens=max_tokens, sampler=sampler):
        last = response
        chunk = response.text
        if state is not None:
            state, chunk, now = TextStateMachine.step(state, chunk)
            if now is None:  # a stop string: what came before it is sent, the rest never
                if chunk:
                    yield {"type": "text", "text": chunk}
                finish = "stop"
                break
            if response.finish_reason:
                state, held, _ = TextStateMachine.flush(state)
                chunk += held
        if chunk:
            yield {"type": "text", "text": chunk}
        if response.finish_reason:
            finish = response.finish_reason
        elif should_stop():
            finish = "cancelled"
            break
    yield {
        "type": "end",
        "finish_reason": finish,
        "prompt_tokens": len(tokens),
        "completion_tokens": last.generation_tokens if last else 0,
        "seconds": round(time.perf_counter() - started, 3),
    }
