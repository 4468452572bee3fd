"""The records that every layer shares, as msgspec Structs: what a user asks for (samples,
parameters, the requests behind each job), what a job carries to its worker, and what the
store and the registry hand back (jobs, progress, model records, `meta.json`).

The web layer decodes requests straight into these types and encodes them as answers; its
own bodies (acknowledgements, errors, OpenAI's shapes) live in `web/bodies.py`. Validation
lives in the types; cross-field checks in `__post_init__`, whose ValueError msgspec turns
into a ValidationError that names the path.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

# `(?![\s\S])` is "end of string" in Python and in JSON Schema's ECMA dialect alike; `$` would
# also match before a final newline under msgspec's re.search ("abc\n" would pass).
ID_PATTERN = r"^[a-z0-9][a-z0-9._-]*(?![\s\S])"
ModelId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=96,
        pattern=ID_PATTERN,
        description="lower-case letters, digits, '.', '_' and '-', starting with a letter or digit",
    ),
]
Suffix = Annotated[str, Meta(min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9_-]*(?![\s\S])")]
ModelRef = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=1024,
        description="`default`, a model id from GET /models, a local model folder, or a Hugging Face repo id",
    ),
]
NonEmptyStr = Annotated[str, Meta(min_length=1)]
# Not blank: described in the OpenAPI document, checked by `_check_samples`, whose error names the
# sample (a msgspec pattern's would not). With both descriptions below, a client can build valid
# samples from the document alone.
SampleText = Annotated[str, Meta(extra_json_schema={"pattern": r"\S"})]
# What a sample object's fields may be together (`Sample.__post_init__` checks it): the OpenAPI
# document adds this to the `Sample` schema, as msgspec cannot attach it to a Struct.
_SAMPLE_FIELDS = {
    "text": "string",
    "prompt": "string",
    "completion": "string",
    "messages": "array",
    "chosen": "string",
    "rejected": "string",
    "system": "string",
    "input": "object",
    "preferred_output": "array",
    "non_preferred_output": "array",
}


def _only(*fields: str, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """These fields (and the optional ones), the others absent or null."""
    types = {f: (t if f in fields or f in optional else "null") for f, t in _SAMPLE_FIELDS.items()}
    properties: dict[str, Any] = {f: {"type": t} for f, t in types.items()}
    for name in ("messages", "preferred_output", "non_preferred_output"):
        properties[name] |= {"minItems": 1} if name in fields else {}
    return {"required": list(fields), "properties": properties}


SAMPLE_FORMS = {
    "oneOf": [
        _only("text"),
        _only("prompt", "completion"),
        _only("messages"),
        _only("prompt", "chosen", "rejected", optional=("system",)),
        _only("input", "preferred_output", "non_preferred_output"),
    ]
}
# A sample form, as requests, files and records name it.
SampleForm = Literal["text", "completions", "chat", "preference"]

JobStatus = Literal["queued", "running", "success", "failed", "cancelled", "paused"]
JobKind = Literal["finetune", "fuse", "quantize", "export", "push"]
# No longer running or waiting to (a paused job is, until it is resumed).
FINISHED: tuple[str, ...] = ("success", "failed", "cancelled", "paused")


class Message(Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class PreferenceInput(Struct, forbid_unknown_fields=True):
    messages: Annotated[list[Message], Meta(min_length=1)]


class Sample(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One sample in one of mlx-lm's formats (text, prompt/completion, or chat) or a preference row:
    TRL's and mlx-lm-lora's `prompt`/`chosen`/`rejected` (with an optional `system`), or OpenAI's
    `input`/`preferred_output`/`non_preferred_output`. One Struct for all, as msgspec decodes a
    union of one object type; `__post_init__` tells which form it is and names what is missing."""

    text: SampleText | None = None
    prompt: SampleText | None = None
    completion: SampleText | None = None
    messages: list[Message] | None = None
    chosen: SampleText | None = None
    rejected: SampleText | None = None
    system: str | None = None
    input: PreferenceInput | None = None
    preferred_output: list[Message] | None = None
    non_preferred_output: list[Message] | None = None

    def __post_init__(self):
        pair = self.chosen is not None or self.rejected is not None
        openai = self.input is not None or self.preferred_output is not None or self.non_preferred_output is not None
        forms = [
            name
            for name, present in (
                ("text", self.text is not None),
                ("prompt/completion", (self.prompt is not None or self.completion is not None) and not pair),
                ("messages", self.messages is not None),
                ("prompt/chosen/rejected", pair),
                ("input/preferred_output/non_preferred_output", openai),
            )
            if present
        ]
        if len(forms) != 1:
            raise ValueError(
                "a sample object has exactly one of `text`, `prompt` with `completion`, `messages`, or a preference"
                " row: `prompt` with `chosen` and `rejected`, or `input` with `preferred_output` and"
                " `non_preferred_output`"
            )
        form = forms[0]
        if form == "prompt/completion" and (self.prompt is None or self.completion is None):
            raise ValueError("a prompt/completion sample needs both `prompt` and `completion`")
        if self.messages is not None and not self.messages:
            raise ValueError("`messages` is empty")
        if form == "prompt/chosen/rejected":
            missing = [f for f in ("prompt", "chosen", "rejected") if getattr(self, f) is None]
            if missing or self.completion is not None:
                raise ValueError(
                    "a preference row needs `prompt`, `chosen` and `rejected`"
                    + (f" (missing: {', '.join(missing)})" if missing else "; `completion` does not belong in it")
                )
        elif self.system is not None:
            raise ValueError("`system` belongs to a prompt/chosen/rejected preference row")
        if form == "input/preferred_output/non_preferred_output":
            for name in ("input", "preferred_output", "non_preferred_output"):
                if not getattr(self, name):
                    raise ValueError(f"a preference row in OpenAI's format needs `{name}`")
            for name in ("preferred_output", "non_preferred_output"):
                for i, message in enumerate(getattr(self, name)):
                    if message.role != "assistant":
                        raise ValueError(f"`{name}[{i}].role` must be assistant, not {message.role}")

    @property
    def form(self) -> SampleForm:
        if self.text is not None:
            return "text"
        if self.messages is not None:
            return "chat"
        if self.chosen is not None or self.input is not None:
            return "preference"
        return "completions"


SampleIn = SampleText | Sample


def sample_form(sample: SampleIn) -> SampleForm:
    return "text" if isinstance(sample, str) else sample.form


def _check_samples(samples: list[SampleIn], field: str) -> str:
    """The one format of a list of samples; raises ValueError naming the bad sample."""
    forms = set()
    for i, sample in enumerate(samples):
        texts = [sample] if isinstance(sample, str) else sample_texts(sample)
        if any(not t.strip() for t in texts):
            raise ValueError(f"`{field}[{i}]` is empty or blank")
        forms.add(sample_form(sample))
    if len(forms) > 1:
        raise ValueError(f"`{field}` mixes sample formats ({', '.join(sorted(forms))}); use one format per request")
    return forms.pop()


def sample_texts(sample: Sample) -> list[str]:
    """The texts that must not be blank (a system prompt may be)."""
    if sample.text is not None:
        return [sample.text]
    if sample.messages is not None:
        return [m.content for m in sample.messages]
    if sample.input is not None:
        answers = [*(sample.preferred_output or []), *(sample.non_preferred_output or [])]
        return [m.content for m in [*sample.input.messages, *answers]]
    if sample.chosen is not None:
        return [sample.prompt or "", sample.chosen, sample.rejected or ""]
    return [sample.prompt or "", sample.completion or ""]


class FileRecord(Struct, kw_only=True):
    """An uploaded data file (OpenAI's Files API): where it is kept, what it holds."""

    file_id: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    samples: int
    form: SampleForm


class OpenAIOrigin(Struct, kw_only=True, omit_defaults=True):
    """What a fine-tune created through `/v1/fine_tuning/jobs` was asked with, in OpenAI's terms,
    kept with its job so that the job reads back as it was created."""

    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    metadata: dict[str, str] = {}
    hyperparameters: dict[str, Any] = {}  # as asked ("auto" or a value)
    method: str = "supervised"


REHEARSAL_DEFAULT = 0.5  # chosen by measurement: docs/retention.md

# "auto" values, the same here and in OpenAI's fine-tuning API (openai_jobs.py), README's rules:
BASE_LEARNING_RATE = 1e-5  # Parameters' default; what OpenAI's multiplier of 1 means
AUTO_MULTIPLIER = 10.0  # "auto" learning rate: 1e-4, at which LoRA learns from a few dozen samples
AUTO_BATCH_SIZE = 4
TARGET_EPOCHS, MIN_EPOCHS, MAX_EPOCHS = 3, 1, 25
MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES = 100, 25_000


def auto_epochs(samples: int) -> int:
    """OpenAI's cookbook rule: 3 epochs, moved so that samples x epochs is within 100-25,000."""
    if samples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_EPOCHS, MIN_TARGET_EXAMPLES // samples)
    if samples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_EPOCHS, MAX_TARGET_EXAMPLES // samples)
    return TARGET_EPOCHS


class Parameters(Struct, forbid_unknown_fields=True, kw_only=True):
    """Training parameters; the defaults are mlx-lm's own where it has one."""

    # "auto": the rules OpenAI's fine-tuning API has here too (see `resolve_auto`).
    learning_rate: Annotated[float, Meta(gt=0, le=1)] | Literal["auto"] = 1e-5
    epochs: Annotated[int, Meta(ge=1, le=10_000)] | Literal["auto"] = 1
    batch_size: Annotated[int, Meta(ge=1, le=1024)] | Literal["auto"] = 4
    fine_tune_type: Literal["lora", "dora", "full"] = "lora"
    rank: Annotated[int, Meta(ge=1, le=1024)] = 8
    alpha: Annotated[float, Meta(gt=0)] | None = None
    scale: Annotated[float, Meta(gt=0)] | None = None
    dropout: Annotated[float, Meta(ge=0, lt=1)] = 0.0
    # None: the last 16 blocks (mlx-lm's default), or all of them in a smaller model; -1: all.
    num_layers: Annotated[int, Meta(ge=-1, le=1024)] | None = None
    max_seq_length: Annotated[int, Meta(ge=16, le=131_072)] = 2048
    mask_prompt: bool = False
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] = 0
    optimizer: Literal["adam", "adamw", "sgd", "adafactor"] = "adam"
    weight_decay: Annotated[float, Meta(ge=0, le=1)] | None = None
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: Annotated[int, Meta(ge=0)] = 0
    min_learning_rate: Annotated[float, Meta(ge=0)] = 0.0
    grad_checkpoint: bool = False
    grad_accumulation_steps: Annotated[int, Meta(ge=1, le=1024)] = 1
    steps_per_report: Annotated[int, Meta(ge=1)] = 1
    steps_per_eval: Annotated[int, Meta(ge=1)] = 200
    save_every: Annotated[int, Meta(ge=1)] = 100
    val_batches: Annotated[int, Meta(ge=-1)] = -1
    # Which adapter is published: the last one, or the one of the lowest validation loss.
    keep: Literal["last", "best"] = "last"
    # Early stopping: end training once this many evaluations in a row (`steps_per_eval`) have not
    # lowered the validation loss by more than `early_stopping_min_delta`. Needs validation data.
    early_stopping_patience: Annotated[int, Meta(ge=1)] | None = None
    early_stopping_min_delta: Annotated[float, Meta(ge=0)] = 0.0
    # Reuse the frozen blocks' outputs from the second epoch on (exact; see tuner/prefix_cache.py).
    prefix_cache: bool = True
    # On the CPU, multiply by the frozen weights in bfloat16 (AVX-512 BF16 or Intel AMX; float32
    # accumulation), as PyTorch's bfloat16 autocast does. Faster, not exact: see accel/bf16/.
    # Where it cannot apply (no such CPU, no kernel, a GPU), training runs in float32 and the
    # job's events say why.
    cpu_bfloat16: bool = False
    # Retention (tuner/retention.py): after training, how likely the tuned model still finds the
    # base's own greedy answers to 24 general prompts, per token, against the base (1.0: as likely;
    # exp of minus the mean log-prob drop), and how many of them it still gives. Below
    # `retention_threshold` a warning names the answers that changed, before and after.
    retention_check: bool = True
    retention_threshold: Annotated[float, Meta(ge=0, le=1)] = 0.7
    # Also measure retention at each evaluation (`steps_per_eval`), and stop training when it falls
    # below the threshold: the adapter of the last evaluation above it is published.
    retention_stop: bool = False
    # Rehearsal: the base's own answers to other general prompts mixed into every epoch, this many
    # per training sample (at most 48 in all); 0 switches it off. It keeps what the base knew.
    rehearsal: Annotated[float, Meta(ge=0, le=4)] = REHEARSAL_DEFAULT
    # What rehearsal trains towards: "answers", the base's greedy answers (cross-entropy), or "kl",
    # the base's whole next-token distributions on those answers (KL divergence from the base, the
    # adapter switched off: one more forward pass per batch, no second copy of the weights).
    rehearsal_loss: Literal["answers", "kl"] = "answers"
    # What training optimises: "sft", the next-token loss on the samples; "dpo" or "orpo", on
    # preference rows, the chosen answer over the rejected one (tuner/preference.py).
    method: Literal["sft", "dpo", "orpo"] = "sft"
    # DPO's temperature: how far the tuned model may move from the reference (None: 0.1).
    beta: Annotated[float, Meta(gt=0, le=10)] | None = None
    # ORPO's weight of the odds-ratio term beside the chosen answers' cross-entropy (None: 0.1).
    orpo_lambda: Annotated[float, Meta(gt=0, le=10)] | None = None
    # Data-parallel ranks (jobs/cluster.py): at most the server's (--ranks, --hostfile); 1: one
    # process; None: all of them.
    ranks: Annotated[int, Meta(ge=1, le=1024)] | None = None

    def __post_init__(self):
        if self.alpha is not None and self.scale is not None:
            raise ValueError("give `parameters.alpha` or `parameters.scale`, not both")
        if self.fine_tune_type == "full" and (self.alpha is not None or self.scale is not None):
            raise ValueError("`parameters.alpha`/`scale` apply to lora and dora, not full fine-tuning")
        if self.weight_decay is not None and self.optimizer not in ("adamw", "sgd"):
            raise ValueError("`parameters.weight_decay` applies to the adamw and sgd optimizers")
        if self.val_batches == 0:
            raise ValueError("`parameters.val_batches` must be -1 (all) or at least 1")
        if self.retention_stop and not self.retention_check:
            raise ValueError("`parameters.retention_stop` needs `parameters.retention_check`")
        if self.rehearsal_loss == "kl" and self.fine_tune_type != "lora":
            raise ValueError(
                '`parameters.rehearsal_loss` "kl" needs `fine_tune_type` "lora": the base is the model with'
                " its LoRA layers switched off"
            )
        if self.rehearsal_loss == "kl" and self.rehearsal == 0:
            raise ValueError('`parameters.rehearsal_loss` "kl" needs `parameters.rehearsal` above 0')
        if self.learning_rate == "auto":
            self.learning_rate = BASE_LEARNING_RATE * AUTO_MULTIPLIER
        if self.batch_size == "auto":
            self.batch_size = AUTO_BATCH_SIZE
        if self.min_learning_rate > self.learning_rate:
            raise ValueError("`parameters.min_learning_rate` is larger than `parameters.learning_rate`")
        if self.beta is not None and self.method != "dpo":
            raise ValueError('`parameters.beta` applies to `parameters.method` "dpo"')
        if self.orpo_lambda is not None and self.method != "orpo":
            raise ValueError('`parameters.orpo_lambda` applies to `parameters.method` "orpo"')
        if self.method != "sft" and self.rehearsal_loss == "kl":
            raise ValueError('`parameters.rehearsal_loss` "kl" applies to `parameters.method` "sft"')

    @property
    def dpo_beta(self) -> float:
        return 0.1 if self.beta is None else self.beta

    @property
    def orpo_weight(self) -> float:
        return 0.1 if self.orpo_lambda is None else self.orpo_lambda

    def concrete(self) -> tuple[float, int, int]:
        """learning_rate, epochs and batch_size once "auto" is resolved (FinetuneRequest resolves epochs)."""
        rate, epochs, batch = self.learning_rate, self.epochs, self.batch_size
        if isinstance(rate, str) or isinstance(epochs, str) or isinstance(batch, str):
            raise ValueError('`parameters` still hold an unresolved "auto"')
        return rate, epochs, batch

    @property
    def lora_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        if self.alpha is not None:
            return self.alpha / self.rank
        return 20.0  # mlx-lm's default


# What each parameter means, as README's table says it (shorter): the OpenAPI document carries
# these as descriptions, and the dashboard shows them beside each field. A test keeps the two in step.
PARAMETER_HELP: dict[str, str] = {
    "learning_rate": "peak learning rate (0 < lr <= 1); auto: 1e-4",
    "epochs": "passes over the data, each sample seen exactly this often; auto: 3, kept within 100-25,000 samples seen",
    "batch_size": "samples per step; the last batch of an epoch may be smaller; auto: 4",
    "fine_tune_type": "lora, dora or full",
    "rank": "LoRA rank",
    "alpha": "sets the LoRA scale to alpha / rank, as in PEFT (give alpha or scale, not both)",
    "scale": "LoRA scale (default 20.0)",
    "dropout": "LoRA dropout",
    "num_layers": "how many of the last transformer blocks get adapters (default 16, or all if fewer); -1 for all",
    "max_seq_length": "longer samples are truncated (the job reports a warning event)",
    "mask_prompt": "train on completions only (prompt/completion and chat data)",
    "seed": "seeds batch order, LoRA initialisation and dropout",
    "optimizer": "adam, adamw, sgd or adafactor",
    "weight_decay": "for adamw (default 0.01) and sgd (default 0)",
    "lr_schedule": "constant, or cosine (decays to min_learning_rate)",
    "min_learning_rate": "where a cosine schedule ends",
    "warmup_steps": "linear warm-up from 0 over this many optimizer steps",
    "grad_checkpoint": "trade compute for memory",
    "grad_accumulation_steps": "steps per optimizer update",
    "steps_per_report": "how often progress (loss, tokens/s) is reported",
    "steps_per_eval": "how often the validation loss is computed (also at the start and the end)",
    "save_every": "checkpoint interval (weights and optimizer state)",
    "val_batches": "validation batches per evaluation (-1: the whole validation set)",
    "keep": "best publishes the adapter of the lowest validation loss (needs validation data)",
    "early_stopping_patience": "stop after this many evaluations in a row without a lower validation loss",
    "early_stopping_min_delta": "how much lower the validation loss must be to count as lower",
    "prefix_cache": "from the second epoch on, reuse the frozen blocks' outputs (exact)",
    "cpu_bfloat16": "on the CPU, multiply by the frozen weights in bfloat16 (with AVX-512 BF16 or AMX; not exact)",
    "rehearsal": "keep what the base knew: its own answers to general prompts, this many per training sample; 0: off",
    "rehearsal_loss": "answers: the base's greedy answers; kl: its whole next-token distributions (keeps more, slower)",
    "retention_check": "after training, measure how much of the base's behaviour the adapter kept",
    "retention_threshold": "below this retention a warning names the general answers that changed",
    "retention_stop": "measure retention at every evaluation too, and stop when it falls below the threshold",
    "method": "sft; or dpo or orpo, on preference rows: the chosen answer over the rejected one",
    "beta": "DPO's temperature: how far the model may move from the reference (default 0.1)",
    "orpo_lambda": "ORPO's weight of the odds-ratio term beside the chosen answers' loss (default 0.1)",
    "ranks": "data-parallel ranks to train on, at most the server's (--ranks, --hostfile); 1: one process; default all",
}


def to_records(samples: list[SampleIn]) -> list[dict]:
    """Request samples as the dicts mlx-lm's datasets read: strings become `{"text": ...}`."""
    return [{"text": s} if isinstance(s, str) else msgspec.to_builtins(s) for s in samples]


def data_fingerprint(samples: list[SampleIn]) -> str:
    """The sha256 of a list of samples, as an adapter's `meta.json` records it."""
    return hashlib.sha256(msgspec.json.encode(to_records(samples))).hexdigest()


class FinetuneRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    base_model: ModelRef
    training_data: Annotated[list[SampleIn], Meta(min_length=1)]
    parameters: Parameters = msgspec.field(default_factory=Parameters)
    validation_data: list[SampleIn] | None = None
    suffix: Suffix | None = None
    # Start from an existing adapter's weights (`ADAPTER_ID`, or a checkpoint `ADAPTER_ID@N`), of the
    # same base and LoRA shape; a new adapter, whose lineage records it.
    resume_from: Annotated[str, Meta(min_length=1, max_length=140)] | None = None
    # Queue it even where its estimated peak memory is over what the machine has (POST /datasets/check).
    force: bool = False

    def __post_init__(self):
        form = _check_samples(self.training_data, "training_data")
        if self.parameters.epochs == "auto":  # the one "auto" that needs the data
            self.parameters.epochs = auto_epochs(len(self.training_data))
        if self.validation_data and _check_samples(self.validation_data, "validation_data") != form:
            raise ValueError("`validation_data` must use the same format as `training_data`")
        if self.parameters.keep == "best" and not self.validation_data:
            raise ValueError("`parameters.keep` = best needs `validation_data` to tell which adapter is best")
        if self.parameters.early_stopping_patience and not self.validation_data:
            raise ValueError("`parameters.early_stopping_patience` needs `validation_data` to watch")
        if self.parameters.mask_prompt and form == "text":
            raise ValueError("`parameters.mask_prompt` needs prompt/completion or messages samples, not plain text")
        method = self.parameters.method
        if form == "preference" and method == "sft":
            raise ValueError(
                '`training_data` holds preference rows: set `parameters.method` to "dpo" or "orpo" to train on them'
            )
        if form != "preference" and method != "sft":
            raise ValueError(
                f'`parameters.method` "{method}" trains on preference rows: `prompt`/`chosen`/`rejected`, or'
                f" `input`/`preferred_output`/`non_preferred_output`; `training_data` holds {form} samples"
            )

    @property
    def data_form(self) -> str:
        return sample_form(self.training_data[0])

    @property
    def data_summary(self) -> dict[str, Any]:
        """What the job trains on, as `meta.json` and `GET /jobs/{id}` show it."""
        return {
            "samples": len(self.training_data),
            "validation_samples": len(self.validation_data or []),
            "format": self.data_form,
            "sha256": data_fingerprint(self.training_data),
        }


AdapterRef = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=106,
        pattern=r"^[a-z0-9][a-z0-9._-]*(@[0-9]{1,9})?(?![\s\S])",
        description="an adapter id, or one of its checkpoints: ADAPTER_ID@ITERATION",
    ),
]


class FuseRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    base_model: ModelRef
    lora_adapter: AdapterRef
    suffix: Suffix | None = None
    dequantize: bool = False


class DatasetCheck(Struct, kw_only=True):
    """What a fine-tune will train on and cost (`POST /datasets/check`; jobs/estimate.py says how)."""

    format: str
    samples: int
    validation_samples: int
    rehearsal_samples: int
    tokens: int  # of the training samples, as training tokenizes them
    validation_tokens: int
    longest: int
    truncated: int  # samples longer than max_seq_length
    steps: int
    epochs: int
    estimated_seconds: float | None  # None until this machine's rate is known
    estimated_peak_memory_bytes: int
    memory_bytes: int  # what the machine has (or MLX_LORA_API_MEMORY_LIMIT)
    fits: bool
    rate_flops: float | None
    rate_source: str
    flops: float  # the steps' arithmetic
    notes: list[str] = []


class AdapterImportRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """A Hugging Face PEFT LoRA adapter to import as an adapter of the registry."""

    source: Annotated[
        str, Meta(min_length=1, max_length=1024, description="a PEFT adapter folder, or a Hugging Face repo id")
    ]
    # The base it adapts: a registry model, a model folder or a Hub id; by default the adapter's own
    # `base_model_name_or_path` (a registry model imported from that Hub id counts).
    base_model: ModelRef | None = None
    suffix: Suffix | None = None


class QuantizeRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    bits: Literal[4, 8] = 4
    group_size: Literal[32, 64, 128] = 64
    suffix: Suffix | None = None


class ExportRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    # gguf: a model (base or fused) as a float16 GGUF file with an Ollama Modelfile, or an adapter
    # as a GGUF LoRA adapter (llama.cpp's --lora); peft: an adapter as a Hugging Face PEFT folder
    # (adapter_config.json, adapter_model.safetensors).
    format: Literal["gguf", "peft"] = "gguf"


class PushRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    repo_id: Annotated[str, Meta(min_length=1, max_length=200)]
    private: bool = True
    commit_message: Annotated[str, Meta(min_length=1, max_length=1000)] | None = None


class Progress(Struct, omit_defaults=True):
    iteration: int = 0
    total_iterations: int | None = None
    epoch: float | None = None
    epochs: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    trained_tokens: int | None = None
    peak_memory_gb: float | None = None
    retention: float | None = None  # after training: see Parameters.retention_threshold
    retention_answers_kept: int | None = None
    # Preference runs (parameters.method dpo or orpo): the chosen answer's reward over the rejected's.
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    val_reward_margin: float | None = None
    val_reward_accuracy: float | None = None
    elapsed_seconds: float | None = None
    eta_seconds: float | None = None
    # A data-parallel run (jobs/cluster.py): how many ranks, with which backend, on which hosts.
    ranks: int | None = None
    backend: str | None = None
    hosts: list[str] | None = None


class Checkpoint(Struct):
    iteration: int
    file: str  # relative to the adapter's folder
    val_loss: float | None = None


class Job(Struct):
    job_id: str
    kind: JobKind
    status: JobStatus
    model_id: str
    base_model: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress = msgspec.field(default_factory=Progress)
    checkpoints: list[Checkpoint] = msgspec.field(default_factory=list)
    message: str | None = None
    error: str | None = None
    # A fine-tune's parameters and what it trains on (GET /jobs/{id} only; not in lists).
    parameters: dict[str, Any] | None = None
    training_data: dict[str, Any] | None = None


class JobList(Struct):
    jobs: list[Job]
    next_before: int | None = None
    latest_event: int = 0  # the newest event's id when listed: where GET /jobs/events goes on from


class ModelRecord(Struct, omit_defaults=True):
    model_id: str
    kind: Literal["base", "adapter", "fused"]
    created_at: float
    size_bytes: int
    # queued/running: a job is making it; damaged: its meta.json cannot be read (`problem` says why)
    status: Literal["ready", "queued", "running", "damaged"]
    base_model: str | None = None
    adapter: str | None = None
    job_id: str | None = None
    source: str | None = None
    parameters: dict[str, Any] | None = None
    training_data: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    retention: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    resumed_from: str | None = None
    adapter_checkpoint: int | None = None
    files: list[str] | None = None
    problem: str | None = None


class GenerateRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """Try a model: a base, an adapter (its base plus the adapter) or a fused model."""

    model: ModelRef = "default"
    prompt: NonEmptyStr | None = None
    messages: Annotated[list[Message], Meta(min_length=1)] | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=32_768)] = 256
    temperature: Annotated[float, Meta(ge=0, le=2)] = 0.0
    top_p: Annotated[float, Meta(gt=0, le=1)] = 1.0
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None
    stop: Annotated[list[NonEmptyStr], Meta(max_length=8)] | None = None
    stream: bool = False

    def __post_init__(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either `prompt` or `messages`")


# What a preference run reports beside its loss, in this order (tuner/preference.py; TrainPoint).
PREFERENCE_METRICS = (
    "reward_margin",
    "reward_accuracy",
    "chosen_reward",
    "rejected_reward",
    "chosen_logps",
    "rejected_logps",
)


class TrainPoint(Struct, omit_defaults=True):
    iteration: int
    train_loss: float
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    peak_memory_gb: float | None = None
    # Preference runs (tuner/preference.py): the rewards are β(log π - log π_ref) in DPO, λ times the
    # mean log-prob per token in ORPO; the log-probs are DPO's sums, ORPO's means per token.
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    chosen_logps: float | None = None
    rejected_logps: float | None = None


class ValPoint(Struct, omit_defaults=True):
    iteration: int
    val_loss: float
    val_reward_margin: float | None = None
    val_reward_accuracy: float | None = None
    val_chosen_reward: float | None = None
    val_rejected_reward: float | None = None
    val_chosen_logps: float | None = None
    val_rejected_logps: float | None = None


class Metrics(Struct):
    job_id: str
    train: list[TrainPoint]
    validation: list[ValPoint]


# -- the registry's records ------------------------------------------------------------------

ModelKind = Literal["base", "adapter", "fused"]


class ModelMeta(Struct, omit_defaults=True, kw_only=True):
    """A folder's `meta.json`: what the service knows of it beyond mlx-lm's own files."""

    kind: ModelKind
    created_at: float
    base_model: str | None = None
    base_source: str | None = None
    adapter: str | None = None
    job_id: str | None = None
    source: str | None = None
    parameters: dict[str, Any] | None = None
    training_data: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    retention: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    resumed_from: str | None = None  # the adapter (or checkpoint) whose weights training started from
    adapter_checkpoint: int | None = None  # a fused model made from this checkpoint of `adapter`
    hub_id: str | None = None  # where the Hub knows this model (or the base it came from)
    license: str | None = None


class BaseModel(Struct, frozen=True):
    """A resolved `base_model`: `ref` is its identity (a registry id, a folder or a repo id)."""

    ref: str
    source: Literal["registry", "path", "hub"]
    path: str | None = None  # None for a Hub repo not in the local cache yet


# -- what a job carries from submission to its worker ----------------------------------------


class FinetuneSpec(Struct, tag="finetune", kw_only=True):
    job_id: str
    model_id: str
    base: BaseModel
    request: FinetuneRequest
    openai: OpenAIOrigin | None = None  # created through /v1/fine_tuning/jobs
    data: dict[str, Any] | None = None  # request.data_summary, computed at submission
    # With `request.resume_from`: the adapter it starts from (kept from deletion while queued) and
    # the weights file, resolved at submission.
    adapter: str | None = None
    initial_weights: str | None = None
    estimate: DatasetCheck | None = None  # at submission, where the base was on this machine


class FuseSpec(Struct, tag="fuse", kw_only=True):
    job_id: str
    model_id: str
    base: BaseModel
    adapter: str  # the adapter's id
    request: FuseRequest
    checkpoint: int | None = None  # fuse this checkpoint of the adapter rather than its final weights


class QuantizeSpec(Struct, tag="quantize", kw_only=True):
    job_id: str
    model_id: str  # the new model
    base: BaseModel  # the model quantized
    request: QuantizeRequest


class ExportSpec(Struct, tag="export", kw_only=True):
    job_id: str
    model_id: str  # the model exported; the files go into its gguf/ (or peft/) folder
    base: BaseModel
    request: ExportRequest
    base_name: str | None = None  # peft: the base as the PEFT config names it (a Hub id where known)
    adapter_base: BaseModel | None = None  # an adapter's gguf: its base, whose GGUF export it applies to


class PushSpec(Struct, tag="push", kw_only=True):
    job_id: str
    model_id: str  # the model or adapter pushed
    base: BaseModel  # ref: the same id; path: its folder
    request: PushRequest
    card: str


JobSpec = FinetuneSpec | FuseSpec | QuantizeSpec | ExportSpec | PushSpec


def checkpoint_file(iteration: int) -> str:
    """A checkpoint's adapter weights in an adapter's `checkpoints/` folder (tuner/checkpoints.py)."""
    return f"{iteration:07d}_adapters.safetensors"


def job_kind(spec: JobSpec) -> str:
    return str(type(spec).__struct_config__.tag)


encode_spec = msgspec.json.Encoder().encode
decode_spec = msgspec.json.Decoder(JobSpec).decode
