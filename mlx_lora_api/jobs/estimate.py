"""What a fine-tune will cost before it runs (`POST /datasets/check`, and every submission): its
data's tokens as training will see them, its steps, its wall time and its peak memory. No MLX:
the base's tokenizer through `transformers` (as mlx-lm's own is), its shapes from `config.json`
and the safetensors headers.

- **Tokens** as mlx-lm's datasets make them: text samples encoded with the end-of-sequence token
  appended, chat and prompt/completion samples through the chat template; preference rows as two
  chats. Batches as tuner/datasets.py builds them (length-sorted, padded to a multiple of 8 plus
  one), so `steps` is the job's `total_iterations`.
- **Time**: the step's arithmetic (a forward pass of every block and the output layer per padded
  token, the backward pass through the trained blocks; the frozen blocks skipped from the second
  epoch where the prefix cache applies; attention's quadratic part), divided by a rate measured
  on this machine: the arithmetic of the fine-tunes that finished here over their steps' own
  seconds (the median of the last `KEPT`, per device), kept in `calibration.json` in the data
  folder and refreshed by every finished fine-tune. Before the first one, the rate comes from
  the probe's own measurement of a matmul at a step's shapes, at `FIRST_GUESS` of it. Loading
  the model, the retention check and validation are added at the same rate.
- **Peak memory**: the weights (float32 on the CPU, their stored type on a GPU), the trainable
  parameters with their gradients and Adam's two moments, the activations the backward pass
  keeps for the longest batch (per token and trained block: the inputs of the attention and MLP
  matmuls and the attention probabilities), the output layer's logits where they are formed,
  the prefix cache, and the process's own `PROCESS_BYTES`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgspec

from ..types import DatasetCheck, FinetuneRequest, SampleIn, to_records

log = logging.getLogger("mlx_lora_api")

CALIBRATION_FILE = "calibration.json"  # in the data folder
PAD_MULTIPLE = 8  # tuner/datasets.py's
KEPT = 20  # finished fine-tunes the rate is the median of
# Of the probe's matmul rate: what steps reached of it here (SmolLM2-135M, 2-core Zen 4: the seed-style
# job's steps ran at 1.0x the probe's 95 GFLOP/s as this module counts them; 0.35, the first value,
# made its estimate 313 s against 149 s).
FIRST_GUESS = 1.0
PROCESS_BYTES = 350 << 20  # Python, MLX, numpy and the tokenizer in a worker (measured: 94 MiB + 250 MiB)
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F64": 8, "U8": 1, "I8": 1}


def machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 << 30


class ModelShape(msgspec.Struct, frozen=True):
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    block_params: int  # in one transformer block
    total_params: int
    stored_bytes: int  # the weights as stored
    quantized: bool


def model_shape(folder: Path) -> ModelShape:
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    sizes: dict[str, tuple[int, int]] = {}  # tensor -> (elements, bytes)
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                elements = math.prod(info["shape"])
                sizes[name] = (elements, elements * DTYPE_BYTES.get(info["dtype"], 4))
    quantized = bool(config.get("quantization"))
    factor = 32 // config["quantization"]["bits"] if quantized else 1  # packed elements per stored one
    block = sum(n for k, (n, _) in sizes.items() if ".layers.0." in k and not k.endswith((".scales", ".biases")))
    return ModelShape(
        layers=int(text["num_hidden_layers"]),
        hidden=int(text["hidden_size"]),
        intermediate=int(text.get("intermediate_size", 4 * text["hidden_size"])),
        heads=int(text["num_attention_heads"]),
        vocab=int(text["vocab_size"]),
        block_params=block * factor,
        total_params=sum(n for k, (n, _) in sizes.items() if not k.endswith((".scales", ".biases"))) * factor,
        stored_bytes=sum(b for _, b in sizes.values()),
        quantized=quantized,
    )


class Tokenizers:
    """The bases' tokenizers, loaded once each (transformers, as mlx-lm loads them), a few kept."""

    def __init__(self, keep: int = 4):
        self._keep = keep
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def warm(self, folder: str) -> None:
        """Load `folder`'s tokenizer in a thread of its own, so that the first fine-tune on it
        does not wait for it: importing transformers takes a second here, and 3 to 5 where torch
        is installed (transformers then imports it too), which is a request's whole wait."""

        def load() -> None:
            try:
                self.get(folder)
            except Exception as e:  # the request that needs it says why
                log.info("the tokenizer of %s was not loaded ahead: %s", folder, e)

        threading.Thread(target=load, name="tokenizer-warm", daemon=True).start()

    def get(self, folder: str) -> Any:
        with self._lock:
            if folder in self._loaded:
                self._loaded.move_to_end(folder)
                return self._loaded[folder]
        from transformers import AutoTokenizer  # lazy: a second or two, on the first check only

        tokenizer = AutoTokenizer.from_pretrained(folder)
        with self._lock:
            self._loaded[folder] = tokenizer
            while len(self._loaded) > self._keep:
                self._loaded.popitem(last=False)
        return tokenizer


def sample_lengths(samples: list[SampleIn], tokenizer: Any) -> list[int]:
    """Each sample's tokens as training sees them (a preference row: its longer answer's sequence)."""
    lengths = []
    for record in to_records(samples):
        if "text" in record:
            tokens = tokenizer.encode(record["text"])
            lengths.append(len(tokens) + (tokens[-1:] != [tokenizer.eos_token_id]))
        elif "messages" in record:
            lengths.append(_chat(tokenizer, record["messages"]))
        elif "completion" in record:
            lengths.append(
                _chat(
                    tokenizer,
                    [
                        {"role": "user", "content": record["prompt"]},
                        {"role": "assistant", "content": record["completion"]},
                    ],
                )
            )
        else:
            prompt, answers = _preference(record)
            lengths.append(max(_chat(tokenizer, prompt + [answer]) for answer in answers))
    return lengths


def _chat(tokenizer: Any, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


def _preference(record: dict) -> tuple[list[dict], list[dict]]:
    if "input" in record:
        return record["input"]["messages"], [record["preferred_output"][-1], record["non_preferred_output"][-1]]
    prompt = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
        {"role": "user", "content": record["prompt"]}
    ]
    return prompt, [
        {"role": "assistant", "content": record["chosen"]},
        {"role": "assistant", "content": record["rejected"]},
    ]


def padded_tokens(lengths: list[int], batch_size: int, max_seq_length: int, pad: int = PAD_MULTIPLE) -> tuple[int, int]:
    """(padded tokens of one epoch's batches as tuner/datasets.py builds them, the widest batch's width)."""
    order = sorted(min(n, max_seq_length) for n in lengths)
    total = widest = 0
    for i in range(0, len(order), batch_size):
        batch = order[i : i + batch_size]
        width = min(1 + pad * math.ceil(batch[-1] / pad), max_seq_length)
        total += len(batch) * width
        widest = max(widest, width)
    return total, widest


class Calibration:
    """The rate this machine computes training steps at, per device: `calibration.json`."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def _read(self) -> dict[str, list[dict[str, float]]]:
        try:
            value = json.loads(self.path.read_text())
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def record(self, device: str, flops: float, seconds: float) -> None:
        """A finished fine-tune: its steps' arithmetic and their seconds."""
        if flops <= 0 or seconds <= 0:
            return
        with self._lock:
            found = self._read()
            found[device] = [*found.get(device, []), {"flops": flops, "seconds": seconds, "at": time.time()}][-KEPT:]
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(found))
            os.replace(temporary, self.path)

    def rate(self, device: str, probe_flops: float | None) -> tuple[float | None, str]:
        """FLOP/s, and where the figure comes from."""
        runs = self._read().get(device, [])
        if runs:
            rate = statistics.median(r["flops"] / r["seconds"] for r in runs)
            return rate, f"the median of the last {len(runs)} fine-tune(s) finished on this machine ({device})"
        if probe_flops:
            return probe_flops * FIRST_GUESS, (
                f"no fine-tune has finished here yet: {FIRST_GUESS} of this machine's measured matmul rate"
                f" ({probe_flops / 1e9:.0f} GFLOP/s); the first finished job replaces it"
            )
        return None, "no rate yet: no fine-tune has finished here and the worker's measurement is not in"


def check(
    request: FinetuneRequest,
    base_folder: Path,
    tokenizer: Any,
    device: str,
    rate: float | None,
    rate_source: str,
    memory_bytes: int,
    cpu_levers: bool,
    retention_cached: bool,
) -> DatasetCheck:
    """The whole report for `request` on the base in `base_folder`."""
    params = request.parameters
    _, epochs, batch_size = params.concrete()
    shape = model_shape(base_folder)
    preferring = params.method != "sft"
    train = sample_lengths(request.training_data, tokenizer)
    val = sample_lengths(request.validation_data or [], tokenizer)
    rows = 2 if preferring else 1  # a preference row is two sequences
    rehearsal = 0 if preferring or not params.rehearsal else min(math.ceil(params.rehearsal * len(train)), 48)
    epoch_lengths = train + [REHEARSAL_TOKENS] * rehearsal
    steps_per_epoch = math.ceil(len(epoch_lengths) / batch_size)
    steps = steps_per_epoch * epochs
    pad = 1 if cpu_levers else PAD_MULTIPLE
    per_epoch, widest = padded_tokens(epoch_lengths, batch_size, params.max_seq_length, pad)
    if rehearsal:  # rehearsal rows are spread over every batch: the longest sets a batch's width
        widest = max(widest, min(REHEARSAL_LONGEST, params.max_seq_length))
    per_epoch *= rows
    val_tokens = rows * padded_tokens(val, batch_size, params.max_seq_length, pad)[0] if val else 0

    trained = shape.layers if params.num_layers == -1 else min(params.num_layers or 16, shape.layers)
    head = 2 * shape.vocab * shape.hidden
    attention = 4 * widest * shape.hidden  # per token per block, forward (QK^T and AV, half a batch's width on average)
    forward = 2 * shape.layers * shape.block_params + head + shape.layers * attention
    backward = 2 * trained * (shape.block_params + attention) + head
    if params.fine_tune_type == "full":
        backward += 2 * trained * shape.block_params
    cached = params.prefix_cache and params.dropout == 0 and params.fine_tune_type != "full" and epochs >= 2
    frozen = 2 * (shape.layers - trained) * (shape.block_params + attention // 2)
    step_flops = per_epoch * (forward + backward) * epochs
    if cached:
        step_flops -= frozen * per_epoch * (epochs - 1)
    evaluations = (math.ceil(steps / params.steps_per_eval) + 1) if val else 0
    other_flops = val_tokens * forward * evaluations
    if params.method == "dpo":
        other_flops += per_epoch * forward  # the reference's pass
    if params.retention_check:
        other_flops += RETENTION_TOKENS * forward
    seconds = None
    if rate:
        seconds = (step_flops + other_flops) / rate + shape.stored_bytes / LOAD_BYTES_PER_SECOND
        if (params.retention_check or rehearsal) and not retention_cached:
            seconds += REFERENCE_SECONDS_PER_BPARAM * shape.total_params / 1e9
        seconds = max(round(seconds, 1), 0.1)

    weights = shape.total_params * 4 if device == "cpu" and not shape.quantized else shape.stored_bytes
    lora_params = (
        trained * 7 * params.rank * 2 * shape.hidden
        if params.fine_tune_type != "full"
        else trained * shape.block_params
    )
    optimizer = lora_params * 4 * 4  # the weights, their gradients, Adam's two moments
    batch_tokens = rows * batch_size * widest
    per_token_block = ACTIVATIONS * 4 * (8 * shape.hidden + 3 * shape.intermediate + shape.heads * widest)
    activations = batch_tokens * trained * per_token_block
    logits = 0 if (cpu_levers and params.rehearsal_loss != "kl") else batch_tokens * shape.vocab * 4 * 3
    cache = min(per_epoch * shape.hidden * 4 + (val_tokens * shape.hidden * 4), 2 << 30) if cached else 0
    peak = PROCESS_BYTES + weights + optimizer + activations + logits + cache
    truncated = sum(n > params.max_seq_length for n in train)
    notes = []
    if truncated:
        notes.append(
            f"{truncated} sample(s) are longer than max_seq_length={params.max_seq_length} and will be truncated"
        )
    if rehearsal:
        notes.append(
            f"{rehearsal} rehearsal samples (the base's own answers) join every epoch, counted at"
            f" {REHEARSAL_TOKENS} tokens each; fewer where some of the base's answers are blank"
        )
    return DatasetCheck(
        format=request.data_form,
        samples=len(train),
        validation_samples=len(val),
        rehearsal_samples=rehearsal,
        tokens=sum(train),
        validation_tokens=sum(val),
        longest=max(train),
        truncated=truncated,
        steps=steps,
        epochs=epochs,
        estimated_seconds=seconds,
        estimated_peak_memory_bytes=int(peak),
        memory_bytes=memory_bytes,
        fits=peak <= memory_bytes,
        rate_flops=rate,
        rate_source=rate_source,
        flops=step_flops,
        notes=notes,
    )


# A rehearsal sample's length on average and at most (SmolLM2-135M's answers to the 48 prompts, with
# its chat template: 80 and 107 tokens).
REHEARSAL_TOKENS, REHEARSAL_LONGEST = 80, 110
# What MLX keeps of a step's activations, against the matmul inputs and attention probabilities
# counted (softmax's and SiLU's outputs, and freed buffers the allocator keeps): fitted to the
# peaks of SFT and DPO runs of SmolLM2-135M here (docs/benchmarks.md).
ACTIVATIONS = 2
RETENTION_TOKENS = 24 * 75  # the retention check's teacher-forced pass over the base's 24 answers
LOAD_BYTES_PER_SECOND = 500e6  # reading the weights
REFERENCE_SECONDS_PER_BPARAM = 430  # the base's answers, once per base: 57.7 s for SmolLM2-135M here
