"""Text generation with a base, base plus adapter, or fused model (in the generation process:
jobs/generation.py).

Loaded bases are cached, least recently used first out, within a memory budget. An adapter
is laid over its cached base in place (LoRA/DoRA layers wrap the base's own linear layers),
so switching between adapters of one base never reloads the base weights.

Concurrent generations of one base run as one batch (`Batcher`, over mlx-lm's continuous
`BatchGenerator`): each decoding step reads the weights once for every chat in it, where one at
a time read them once per chat (8 chats of SmolLM2-135M on 2 Zen 4 cores: about 2.5x the tokens/s
in all, docs/benchmarks.md). Requests for different LoRA adapters of the base, and for the base
alone, share the batch, as LoRAX serves them: the adapters are laid side by side and each row adds
its own (tasks/mixing.py). Requests for another base, or with an adapter that cannot be mixed
(DoRA, a full fine-tune), wait until the batch before them ends, first come first served.

Each loaded model keeps the keys and values of its latest answers, prompt and reply (mlx-lm's
`LRUPromptCache`, as `mlx_lm.server` keeps them): a request whose tokens begin as an earlier one's
did (the same system prompt, the next turn of a chat, the same question again) reads only the rest.
They are kept by adapter, and an adapter's by the version of its weights on disk (a training job
writes new ones as it goes), and go when the model is unloaded.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import BatchGenerator, TextStateMachine
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_top_p, make_sampler
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import load

from .. import device
from ..tuner import levers
from . import checks, decoding, mixing

log = logging.getLogger("mlx_lora_api")
# Per loaded model: the keys and values of this many answers at most, and this many bytes (a
# 135M model's 100-token answer: 4.6 MB in float32; a 7B model's: about 50 MB).
PROMPTS = 32
PROMPT_BYTES = 512 << 20


class _Entry:
    def __init__(self, model, tokenizer, nbytes: int, fused: decoding.Fused | None):
        self.model = model
        self.tokenizer = tokenizer
        self.nbytes = nbytes
        self.fused = fused  # the decoding step's weights (tasks/decoding.py), while they are current
        self.adapter: str | None = None
        self.prompts = LRUPromptCache(PROMPTS, PROMPT_BYTES)  # by `weights_version(adapter)`


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


MIXED = "adapters side by side"  # an entry's `adapter` while a Mixture is laid over it


def weights_version(adapter: str | None) -> tuple | None:
    """What the keys and values an adapter computed are kept under: its path and its weights'
    modification time and size, which change when a training job saves anew."""
    if adapter is None:
        return None
    weights = Path(adapter) / "adapters.safetensors"
    try:
        stat = weights.stat()
    except OSError:
        return (adapter, None)
    return (adapter, stat.st_mtime_ns, stat.st_size)


def _is_full_fine_tune(adapter: str) -> bool:
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return config.get("fine_tune_type", "lora") == "full"


class ModelCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[str, str | None], _Entry] = OrderedDict()
        self.loads = 0  # how many times weights were read from disk (tests and logs)

    def get(self, base_path: str, adapter_path: str | None = None):
        """The model (with the adapter laid over it), its tokenizer, and what a batch calls to
        decode with it: the model itself, or the compiled step of tasks/decoding.py."""
        entry = self._entry(base_path, adapter_path)
        return entry.model, entry.tokenizer, decoding.decoder(entry.model, entry.fused)

    def mixed(self, base_path: str):
        """The base with nothing laid over it, its tokenizer, its fused weights (tasks/decoding.py)
        and a Mixture to lay adapters over it side by side."""
        entry = self._entry(base_path, None)
        entry.adapter = MIXED  # the next `get` strips what the mixture lays
        return entry.model, entry.tokenizer, entry.fused, mixing.Mixture(entry.model)

    def prompts(self, base_path: str, adapter_path: str | None) -> LRUPromptCache:
        """The keys and values kept for the loaded base (and its full fine-tune, which has an entry
        of its own): load it first, with `get` or `mixed`."""
        return self._entries[self._key(base_path, adapter_path)].prompts

    def clear_prompts(self) -> None:
        """Forget every kept prompt's keys and values (the tests: a batch computed afresh)."""
        for entry in self._entries.values():
            entry.prompts.trim_to(n_sequences=0)  # in place: a batch that is open holds it

    @staticmethod
    def _key(base_path: str, adapter_path: str | None) -> tuple[str, str | None]:
        # A full fine-tune overwrites base weights, so it gets an entry of its own.
        return (base_path, adapter_path if adapter_path and _is_full_fine_tune(adapter_path) else None)

    def _entry(self, base_path: str, adapter_path: str | None) -> _Entry:
        """The cached base (loaded if need be) with the adapter laid over it in place."""
        if adapter_path:
            checks.check_adapter_folder(Path(adapter_path))  # first: its errors name the file
        key = self._key(base_path, adapter_path)
        full = key[1]
        entry = self._entries.get(key)
        if entry is None:
            checks.check_model_folder(Path(base_path))
            model, tokenizer = load(base_path)
            device.cast_for_compute(model)
            if full:
                load_adapters(model, full)
                device.cast_for_compute(model)
            self.loads += 1
            fused = decoding.fuse(model)
            entry = _Entry(model, tokenizer, _nbytes(model) + (fused.nbytes if fused else 0), fused)
            entry.adapter = full
            self._entries[key] = entry
            self._evict(keep=key)
        self._entries.move_to_end(key)
        if entry.adapter != adapter_path:
            _strip_adapter(entry.model)
            if adapter_path:
                load_adapters(entry.model, adapter_path)
                device.cast_for_compute(entry.model)
            entry.adapter = adapter_path
        entry.model.eval()
        return entry

    def _evict(self, keep) -> None:
        while sum(e.nbytes for e in self._entries.values()) > self.budget_bytes and len(self._entries) > 1:
            key = next(k for k in self._entries if k != keep)
            log.info("generation cache: unloading %s", key[0])
            del self._entries[key]
        mx.clear_cache()


Event = dict[str, Any]


def make_seeded_sampler(temperature: float, top_p: float, seed: int | None) -> Callable[[mx.array], mx.array]:
    """mlx-lm's sampler; with a seed, one drawing from a key of its own, split at every token, so
    that a seeded answer is the same whatever else shares its batch."""
    if temperature == 0 or seed is None:
        return make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0)
    state = {"key": mx.random.key(seed)}

    def sampler(logprobs: mx.array) -> mx.array:
        if 0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        state["key"], key = mx.random.split(state["key"])
        return mx.random.categorical(logprobs * (1.0 / temperature), key=key)

    return sampler


@dataclass
class _Request:
    """One generation: what was asked, and where its answer has got to."""

    request_id: int
    base_path: str
    adapter_path: str | None
    prompt: str | None
    messages: list[dict] | None
    max_tokens: int
    sampler: Callable[[mx.array], mx.array]
    stop: list[str] | None
    key: tuple[str, str | None] = ("", None)  # the batch it may join: (base, MIXED) or (base, adapter)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's, read from keys and values kept (`LRUPromptCache`)
    version: tuple | None = None  # the adapter's weights' (`weights_version`): the cache's key
    generated: int = 0
    batch: int = 1  # the most requests decoding together while this one did
    started: float = field(default_factory=time.perf_counter)
    detokenizer: Any = None
    stops: Any = None  # mlx-lm's matcher of stop strings on the decoded text, and its state
    stop_state: Any = None

    def end(self, finish_reason: str) -> Event:
        return {
            "type": "end",
            "finish_reason": finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.generated,
            "seconds": round(time.perf_counter() - self.started, 3),
            "batch": self.batch,
        }

    def text(self, chunk: str, last: bool) -> tuple[str, bool]:
        """What of a decoded chunk may be sent, and whether a stop string ended the answer. Text
        that may begin a stop string is held back until it is known not to, so no part of one is
        ever sent."""
        if self.stops is None:
            return chunk, False
        self.stop_state, chunk, now = TextStateMachine.step(self.stop_state, chunk)
        if now is None:  # a stop string: what came before it is sent, the rest never
            return chunk, True
        if last:
            self.stop_state, held, _ = TextStateMachine.flush(self.stop_state)
            chunk += held
        return chunk, False


class Batcher:
    """Every generation the process has been asked for: one batch of a model's requests decoding
    together, the others waiting their turn. `add` and `cancel` between `step`s, which advances
    the batch by one token and returns each request's events."""

    def __init__(self, cache: ModelCache, max_batch: int = 16, describe: Callable[[BaseException], str] = repr):
        self.cache = cache
        self.max_batch = max_batch
        self.describe = describe  # an error as the user reads it
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}  # by the batch's uid
        self._key: tuple[str, str | None] | None = None  # the batch's (see _Request.key)
        self._batch: BatchGenerator | None = None
        self._tokenizer: Any = None
        self._mixed: _MixedStep | None = None  # a batch of adapters side by side: what it calls
        self._prompts: LRUPromptCache | None = None  # the batch's model's kept keys and values
        self._keep = levers.from_environment().kept_prompts

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running)

    def add(
        self,
        request_id: int,
        base_path: str,
        adapter_path: str | None,
        prompt: str | None,
        messages: list[dict] | None,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: list[str] | None = None,
    ) -> None:
        sampler = make_seeded_sampler(temperature, top_p, seed)
        request = _Request(request_id, base_path, adapter_path, prompt, messages, max_tokens, sampler, stop or None)
        request.key = (base_path, MIXED if adapter_path is None or mixing.mixable(adapter_path) else adapter_path)
        self._waiting.append(request)

    def cancel(self, request_id: int) -> None:
        """Drop a request whose client went away (no event: nobody reads them)."""
        self._waiting = deque(r for r in self._waiting if r.request_id != request_id)
        uids = [uid for uid, r in self._running.items() if r.request_id == request_id]
        if uids and self._batch is not None:
            self._batch.remove(uids)
        for uid in uids:
            del self._running[uid]

    def step(self) -> list[tuple[int, Event]]:
        """Admit what can join the batch, decode one token for each request in it."""
        events = self._admit()
        if not self._running or self._batch is None:
            return events
        try:
            _, responses = self._batch.next()
        except Exception as e:  # the batch's requests fail together (out of memory, ...)
            log.exception("generation failed")
            events += [(r.request_id, {"type": "error", "message": self.describe(e)}) for r in self._running.values()]
            self._running.clear()
            self._close()
            return events
        for running in self._running.values():
            running.batch = max(running.batch, len(self._running))
        for response in responses:
            request = self._running.get(response.uid)
            if request is not None:
                events += [(request.request_id, event) for event in self._advance(request, response)]
        return events

    def _advance(self, request: _Request, response) -> list[Event]:
        request.generated += 1
        finish = response.finish_reason
        if finish == "stop":  # an end-of-sequence token: not text
            request.detokenizer.finalize()
        else:
            request.detokenizer.add_token(response.token)
            if finish is not None:
                request.detokenizer.finalize()
        chunk, stopped = request.text(request.detokenizer.last_segment, last=finish is not None)
        events: list[Event] = [{"type": "text", "text": chunk}] if chunk else []
        if stopped:
            finish = "stop"
            assert self._batch is not None
            self._batch.remove([response.uid])
        if finish is not None:
            del self._running[response.uid]
            events.append(request.end(finish))
            if response.prompt_cache is not None and self._prompts is not None and self._keep:  # read and written
                kept = response.prompt_cache[:-1] if self._mixed is not None else response.prompt_cache  # no _Rows
                self._prompts.insert_cache(request.version, list(response.all_tokens), kept)
        return events

    def _admit(self) -> list[tuple[int, Event]]:
        """Requests for the batch's model join it, in order, up to `max_batch`; once the batch has
        drained, the first waiting request's model gets the next one."""
        events: list[tuple[int, Event]] = []
        if not self._running and self._waiting and self._waiting[0].key != self._key:
            self._close()
        while self._waiting and len(self._running) < self.max_batch:
            request = self._waiting[0]
            if self._key is not None and request.key != self._key:
                break  # its turn comes when this batch ends
            self._waiting.popleft()
            try:
                self._start(request)
            except Exception as e:  # this request's model or prompt: the others go on
                log.warning("generation refused: %s", e)
                events.append((request.request_id, {"type": "error", "message": self.describe(e)}))
                if not self._running:
                    self._close()
        return events

    def _start(self, request: _Request) -> None:
        if self._batch is None:
            self._open(request)
        tokenizer = self._tokenizer
        if request.messages is not None:
            tokens = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True)
        else:
            tokens = tokenizer.encode(request.prompt)
        if not tokens:
            raise ValueError("the prompt is empty once tokenized")
        slot = self._mixed.lay(request.adapter_path) if self._mixed is not None and request.adapter_path else None
        request.prompt_tokens = len(tokens)
        request.version = weights_version(request.adapter_path)
        assert self._prompts is not None
        kept, rest = self._prompts.fetch_nearest_cache(request.version, tokens) if self._keep else (None, tokens)
        if kept is not None and not rest:  # the whole prompt: its last token again, for its logits
            if can_trim_prompt_cache(kept):
                trim_prompt_cache(kept, 1)
                rest = tokens[-1:]
            else:
                kept, rest = None, tokens
        request.cached_tokens = len(tokens) - len(rest)
        request.detokenizer = tokenizer.detokenizer
        if request.stop:
            request.stops = TextStateMachine({"normal": [(s, None) for s in request.stop]})
            request.stop_state = request.stops.make_state()
        request.started = time.perf_counter()
        assert self._batch is not None
        if kept is None:
            caches = [self._mixed.make_cache(slot)] if self._mixed is not None else None
        else:
            caches = [kept + [_Rows([slot])]] if self._mixed is not None else [kept]
        [uid] = self._batch.insert(
            [rest],
            [request.max_tokens],
            caches=caches,
            all_tokens=[tokens[: request.cached_tokens]],  # what the cache holds, as mlx_lm.server says it
            samplers=[request.sampler],
        )
        self._running[uid] = request

    def _open(self, request: _Request) -> None:
        """A batch for the request's base (and its adapter, where adapters cannot be mixed)."""
        if request.key[1] == MIXED:
            model, self._tokenizer, fused, mixture = self.cache.mixed(request.base_path)
            self._mixed = step = _MixedStep(model, fused, mixture)
        else:
            _, self._tokenizer, step = self.cache.get(request.base_path, request.adapter_path)
        self._prompts = self.cache.prompts(request.base_path, None if request.key[1] == MIXED else request.adapter_path)
        self._batch = BatchGenerator(
            step,
            stop_tokens=[[t] for t in self._tokenizer.eos_token_ids],
            completion_batch_size=self.max_batch,
            prefill_batch_size=self.max_batch,
        )
        self._key = request.key

    def _close(self) -> None:
        if self._batch is not None:
            self._batch.close()
        self._batch, self._key, self._tokenizer, self._mixed, self._prompts = None, None, None, None, None


class _Rows:
    """Which adapter each row of a batch uses, carried as one more entry of the row's cache list:
    mlx-lm's `BatchGenerator` merges, splits, filters and extends a batch's caches as its rows come
    and go, so this entry's rows stay those of the caches beside it. `_MixedStep` takes it off
    before the model sees the caches."""

    def __init__(self, slots: list[int | None]):
        self.slots = slots

    def merge(self, caches: list[_Rows]) -> _Rows:
        return _Rows([slot for cache in caches for slot in cache.slots])

    def filter(self, keep: list[int]) -> None:
        self.slots = [self.slots[i] for i in keep]

    def extend(self, other: _Rows) -> None:
        self.slots = self.slots + other.slots

    def extract(self, idx: int) -> _Rows:
        return _Rows([self.slots[idx]])

    def prepare(self, **_) -> None:  # padding: the keys and values' concern
        pass

    def finalize(self) -> None:
        pass

    def empty(self) -> bool:
        return False

    def size(self) -> int:
        return 0

    @property
    def state(self) -> list:  # nothing for mx.eval
        return []

    nbytes = 0


class _MixedStep:
    """What a batch of adapters side by side calls in the model's place: it sets each row's adapter
    (tasks/mixing.py) from the caches' last entry (`_Rows`), then calls the decoding step (or the
    model) with the model's own caches."""

    def __init__(self, model, fused, mixture: mixing.Mixture):
        self.model = model
        self.fused = fused
        self.mixture = mixture
        self.step = decoding.decoder(model, fused, mixture)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self, slot: int | None = None) -> list:
        return [*make_prompt_cache(self.model), _Rows([slot])]

    def lay(self, adapter_path: str) -> int:
        """The adapter's slot, laying it beside the others (and remaking the step) the first time."""
        known = len(self.mixture.paths)
        slot = self.mixture.slot(adapter_path)
        if len(self.mixture.paths) != known:
            self.step = decoding.decoder(self.model, self.fused, self.mixture)
        return slot

    def __call__(self, inputs, cache=None, **kwargs):
        *layers, rows = cache
        self.mixture.select(rows.slots)
        return self.step(inputs, cache=layers, **kwargs)


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
) -> Iterator[Event]:
    """One generation alone: {"type": "text", "text"} chunks, then {"type": "end", "finish_reason",
    usage...} (or {"type": "error", "message"})."""
    batcher = Batcher(cache, max_batch=1)
    batcher.add(0, base_path, adapter_path, prompt, messages, max_tokens, temperature, top_p, seed, stop)
    while batcher.busy:
        for _, event in batcher.step():
            yield event
