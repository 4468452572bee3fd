"""What a fine-tune made the model forget, and the rehearsal that keeps it.

The check: the base answers the PROBES (retention_prompts.py) greedily, once per base (cached
in the data folder). After training, one teacher-forced pass of the tuned model over those
answers gives how much less likely it finds them (the log-prob drop, nats per token, and its
score, exp(-drop)) and, per probe, whether its own greedy answer is still the base's (its argmax at each
answer token is the base's: exactly the condition for greedy decoding to give the same answer, here
over its first KEPT_TOKENS tokens). The base
goes through the same pass when its answers are first computed, so a model equal to its base
keeps all of them, whatever the float rounding.

The rehearsal: the base's own answers to the REHEARSAL prompts, as chat samples with the prompt
masked, mixed into every epoch (self-distillation: the base is its own teacher, no second copy
of the weights, no extra pass per step). Computed with the probes' answers, in the same cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import msgspec
from mlx_lm.generate import batch_generate

from ..types import Message, Sample
from .retention_prompts import PROBES, REHEARSAL

PROBE_TOKENS = 32  # the longest base answer kept (shown in the warning)
KEPT_TOKENS = 16  # an answer is kept when its first 16 tokens are the base's
REHEARSAL_TOKENS = 64
CHUNK = 8  # sequences per teacher-forced pass
SHOWN = 5  # changed answers named in the warning


class Answer(msgspec.Struct):
    prompt: str
    text: str
    prompt_ids: list[int]
    answer_ids: list[int]  # with the end-of-turn token where the answer ended before the limit
    argmax: list[int] = []  # the base's own teacher-forced choices at each answer token
    logprobs: list[float] = []  # the base's log-prob of each answer token


class Reference(msgspec.Struct):
    key: str
    probes: list[Answer]
    rehearsal: list[Answer]


def cache_key(base_path: str, tokenizer) -> str:
    """The base's identity (its config and weight files) and everything the answers depend on."""
    folder = Path(base_path)
    weights = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))
    parts = [
        (folder / "config.json").read_text() if (folder / "config.json").exists() else "",
        json.dumps(weights),
        json.dumps([PROBES, REHEARSAL, PROBE_TOKENS, REHEARSAL_TOKENS]),
        str(getattr(tokenizer, "chat_template", "")),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def reference(
    model: nn.Module, tokenizer, base_path: str, cache_dir: Path | None, on_event: Callable[[dict], None]
) -> Reference | None:
    """The base's answers, from the cache or computed now (the model must still equal its base:
    LoRA layers freshly added leave it so). None when the model has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        on_event(
            {"type": "warning", "message": "no retention check and no rehearsal: the base model has no chat template"}
        )
        return None
    key = cache_key(base_path, tokenizer)
    path = cache_dir / f"{key}.json" if cache_dir else None
    if path is not None and path.exists():
        try:
            cached = msgspec.json.decode(path.read_bytes(), type=Reference)
            if cached.key == key:
                return cached
        except msgspec.ValidationError:
            pass  # written by another version: computed again below
    on_event({"type": "retention_reference", "probes": len(PROBES), "rehearsal": len(REHEARSAL)})
    model.eval()
    probes = _answer(model, tokenizer, PROBES, PROBE_TOKENS)
    for probe, (argmax, logprobs) in zip(probes, _teacher_forced(model, probes)):
        probe.argmax, probe.logprobs = argmax, logprobs
    result = Reference(key, probes, _answer(model, tokenizer, REHEARSAL, REHEARSAL_TOKENS))
    model.train()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(msgspec.json.encode(result))
        os.replace(partial, path)
    return result


def rehearsal_samples(ref: Reference, count: int) -> list[Sample]:
    """The first `count` rehearsal answers as chat samples (training masks their prompts)."""
    return [
        Sample(messages=[Message("user", a.prompt), Message("assistant", a.text)])
        for a in ref.rehearsal[:count]
        if a.text.strip()
    ]


def measure(model: nn.Module, tokenizer, ref: Reference, threshold: float, name_changes: bool = True) -> dict[str, Any]:
    """How much of the base's behaviour the model kept:
    - `score`: how likely it still finds the base's answers, per token, against the base itself
      (exp of minus the mean log-prob drop: 1.0 for a model equal to its base, 0.5 when each
      token of the base's answers became half as likely);
    - `kept` of `probes`: the base's greedy answers it still gives (their first KEPT_TOKENS tokens);
    - when `score` is below `threshold`, the answers that changed, before and after (SHOWN of them)."""
    was_training = model.training
    model.eval()
    kept = 0
    drops: list[float] = []
    changed: list[Answer] = []
    for probe, (argmax, logprobs) in zip(ref.probes, _teacher_forced(model, ref.probes)):
        same = argmax[:KEPT_TOKENS] == probe.argmax[:KEPT_TOKENS]
        kept += same
        drops.extend(b - t for b, t in zip(probe.logprobs, logprobs))
        if not same:
            changed.append(probe)
    drop = sum(drops) / max(len(drops), 1)
    score = min(math.exp(-drop), 1.0)  # a model may find them likelier than the base did: still 1.0
    result: dict[str, Any] = {
        "score": round(score, 4),
        "logprob_drop": round(drop, 4),
        "kept": kept,
        "probes": len(ref.probes),
        "threshold": threshold,
    }
    if name_changes and score < threshold and changed:
        shown = changed[:SHOWN]
        after = _answer(model, tokenizer, [p.prompt for p in shown], PROBE_TOKENS)
        result["changed"] = [{"prompt": p.prompt, "before": p.text, "after": a.text} for p, a in zip(shown, after)]
    if was_training:
        model.train()
    return result


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))


def _answer(model: nn.Module, tokenizer, prompts: list[str], max_tokens: int) -> list[Answer]:
    """Greedy answers, batched (mlx-lm's batch_generate), each ending with the end-of-turn
    token when it ended before `max_tokens`."""
    prompt_ids = [_prompt_ids(tokenizer, p) for p in prompts]
    response = batch_generate(model, tokenizer, prompt_ids, max_tokens=max_tokens, return_token_ids=True)
    answers = []
    for prompt, ids, generated in zip(prompts, prompt_ids, response.token_ids or []):
        ended = len(generated) < max_tokens and tokenizer.eos_token_id is not None
        text = tokenizer.decode(generated)
        answers.append(Answer(prompt, text, ids, [*generated, tokenizer.eos_token_id] if ended else list(generated)))
    return answers


def _teacher_forced(model: nn.Module, answers: list[Answer]) -> list[tuple[list[int], list[float]]]:
    """Per answer: the model's argmax and its log-prob of each answer token, given the prompt and
    the answer's tokens before it (right-padded batches: padding comes after, so it changes nothing)."""
    results = []
    for start in range(0, len(answers), CHUNK):
        chunk = answers[start : start + CHUNK]
        rows = [a.prompt_ids + a.answer_ids for a in chunk]
        width = max(len(r) for r in rows)
        tokens = mx.array([r + [0] * (width - len(r)) for r in rows])
        logits = model(tokens[:, :-1]).astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        argmax = mx.argmax(logits, axis=-1)
        mx.eval(logprobs, argmax)
        for row, answer in enumerate(chunk):
            first, n = len(answer.prompt_ids) - 1, len(answer.answer_ids)
            picked = logprobs[row, first : first + n, :]
            chosen = mx.take_along_axis(picked, mx.array(answer.answer_ids)[:, None], axis=-1)[:, 0]
            choices: list[int] = argmax[row, first : first + n].tolist()  # type: ignore[assignment]
            logprob: list[float] = chosen.tolist()  # type: ignore[assignment]
            results.append((choices, [round(v, 5) for v in logprob]))
    return results
