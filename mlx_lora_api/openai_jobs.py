"""OpenAI's fine-tuning jobs in the service's own terms: what `POST /v1/fine_tuning/jobs` asks
for (files, hyperparameters that may be "auto", a method, metadata) becomes a `FinetuneRequest`
and a record of how it was asked (`OpenAIOrigin`), kept with the job. No HTTP here: `web/
fine_tuning.py` decodes the body into `JobCreate` and shapes the answers.

"auto", documented in README ("From Python and scripts"):
- `n_epochs`: OpenAI's cookbook rule, 3, moved within 1-25 so that samples x epochs stays
  between 100 and 25,000;
- `batch_size`: the service's default, 4;
- `learning_rate_multiplier`: 10, times the service's default learning rate (1e-5): 1e-4, the
  rate at which LoRA learns a fact from a few dozen samples here (docs/retention.md's job) where
  1e-5 barely moves it. An explicit multiplier multiplies 1e-5, as the issue has it.
Chat and prompt/completion samples train on the answers only (`mask_prompt`), as OpenAI's do.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from . import errors
from .registry.uploads import FileStore, Limits
from .types import (
    AUTO_BATCH_SIZE,
    AUTO_MULTIPLIER,
    BASE_LEARNING_RATE,
    FinetuneRequest,
    OpenAIOrigin,
    Parameters,
    auto_epochs,
)

Auto = Literal["auto"]
MetadataKey = Annotated[str, Meta(max_length=64)]
MetadataValue = Annotated[str, Meta(max_length=512)]


class Hyperparameters(Struct, forbid_unknown_fields=True, omit_defaults=True):
    n_epochs: Auto | Annotated[int, Meta(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Meta(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Meta(gt=0, le=1000)] = "auto"


class DpoHyperparameters(Hyperparameters, forbid_unknown_fields=True, omit_defaults=True):
    beta: Auto | Annotated[float, Meta(gt=0, le=2)] = "auto"


class SupervisedMethod(Struct, forbid_unknown_fields=True):
    hyperparameters: Hyperparameters = msgspec.field(default_factory=Hyperparameters)


class DpoMethod(Struct, forbid_unknown_fields=True):
    hyperparameters: DpoHyperparameters = msgspec.field(default_factory=DpoHyperparameters)


class Method(Struct, forbid_unknown_fields=True):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict[str, Any] | None = None


class JobCreate(Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of `POST /v1/fine_tuning/jobs`, as OpenAI's reference has it, and `x_mlx_lora`:
    any of the service's own `parameters` (rank, num_layers, ...)."""

    model: Annotated[str, Meta(min_length=1, max_length=1024)]
    training_file: str
    validation_file: str | None = None
    suffix: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**31 - 1)] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=16)] | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[dict[str, Any]] | None = None
    x_mlx_lora: dict[str, Any] | None = None


# OpenAI's hyperparameter and the service's own parameter it sets.
_OURS = {"n_epochs": "epochs", "batch_size": "batch_size", "learning_rate_multiplier": "learning_rate"}


def build(create: JobCreate, files: FileStore, limits: Limits) -> tuple[FinetuneRequest, OpenAIOrigin]:
    """The fine-tune that `create` asks for, and how it asked; errors name the field at fault."""
    if create.integrations:
        raise errors.BadRequest(
            "integrations (Weights & Biases) are not supported: the service reaches nothing outside this machine",
            param="integrations",
        )
    method = create.method.type if create.method else "supervised"
    if method == "reinforcement":
        raise errors.BadRequest(
            "method 'reinforcement' is not supported: this service trains with 'supervised' or 'dpo'",
            param="method.type",
        )
    asked = _hyperparameters(create, method)
    training, form = _samples(files, create.training_file, "training_file", limits, method)
    validation = None
    if create.validation_file is not None:
        validation, validation_form = _samples(files, create.validation_file, "validation_file", limits, method)
        if validation_form != form:
            raise errors.BadRequest(
                f"the validation file holds {validation_form} samples and the training file {form} samples;"
                " use one format",
                param="validation_file",
            )
    values: dict[str, Any] = {
        "epochs": auto_epochs(len(training)) if asked.n_epochs == "auto" else asked.n_epochs,
        "batch_size": AUTO_BATCH_SIZE if asked.batch_size == "auto" else asked.batch_size,
        "learning_rate": BASE_LEARNING_RATE
        * (AUTO_MULTIPLIER if asked.learning_rate_multiplier == "auto" else asked.learning_rate_multiplier),
        "mask_prompt": form not in ("text", "preference"),
    }
    if method == "dpo":
        values["method"] = "dpo"
        if isinstance(asked, DpoHyperparameters) and asked.beta != "auto":
            values["beta"] = asked.beta
    if create.seed is not None:
        values["seed"] = create.seed
    for key, value in (create.x_mlx_lora or {}).items():
        theirs = next((k for k, ours in _OURS.items() if ours == key), None)
        if theirs is not None and getattr(asked, theirs) != "auto":
            raise errors.BadRequest(
                f"give `hyperparameters.{theirs}` or `x_mlx_lora.{key}`, not both", param=f"x_mlx_lora.{key}"
            )
        if key == "seed" and create.seed is not None:
            raise errors.BadRequest("give `seed` or `x_mlx_lora.seed`, not both", param="x_mlx_lora.seed")
        values[key] = value
    try:
        parameters = msgspec.convert(values, Parameters)
    except msgspec.ValidationError as e:
        message, _, where = str(e).partition(" - at `$.")
        field = where.rstrip("`") if where else None
        raise errors.BadRequest(
            f"invalid x_mlx_lora{'.' + field if field else ''}: {message}",
            param=f"x_mlx_lora.{field}" if field else "x_mlx_lora",
        ) from e
    try:
        request = FinetuneRequest(
            base_model=create.model,
            training_data=training,
            validation_data=validation,
            parameters=parameters,
            suffix=_suffix(create.suffix),
        )
    except ValueError as e:
        raise errors.BadRequest(str(e)) from e
    origin = OpenAIOrigin(
        training_file=create.training_file,
        validation_file=create.validation_file,
        suffix=create.suffix,
        metadata=create.metadata or {},
        hyperparameters=msgspec.to_builtins(asked),
        method=method,
    )
    return request, origin


def _hyperparameters(create: JobCreate, method: str) -> Hyperparameters:
    """The legacy top-level `hyperparameters` or the method's; not both."""
    nested: Hyperparameters | None = None
    if create.method and method == "supervised" and create.method.supervised:
        nested = create.method.supervised.hyperparameters
    elif create.method and method == "dpo":
        nested = create.method.dpo.hyperparameters if create.method.dpo else DpoHyperparameters()
    if nested is not None and create.hyperparameters is not None:
        raise errors.BadRequest(
            f"give `hyperparameters` or `method.{method}.hyperparameters`, not both", param="hyperparameters"
        )
    return nested or create.hyperparameters or Hyperparameters()


def _samples(files: FileStore, file_id: str, param: str, limits: Limits, method: str) -> tuple[list[Any], str]:
    try:
        record = files.get(file_id, param)
        samples, form = files.samples(file_id, limits, param)
    except errors.NotFound as e:
        raise errors.BadRequest(f"{param}: {e.message}; upload it with POST /v1/files", param=param) from e
    if record.purpose != "fine-tune":
        raise errors.BadRequest(f"{param}: {file_id} has purpose {record.purpose!r}, not 'fine-tune'", param=param)
    if form == "preference" and method != "dpo":
        raise errors.BadRequest(
            f"{param}: {file_id} holds preference data, which trains with method 'dpo';"
            " method 'supervised' needs text, prompt/completion or chat samples",
            param=param,
        )
    if form != "preference" and method == "dpo":
        raise errors.BadRequest(
            f"{param}: {file_id} holds {form} samples; method 'dpo' needs preference rows"
            " (input, preferred_output, non_preferred_output)",
            param=param,
        )
    return samples, form


def _suffix(suffix: str | None) -> str | None:
    """OpenAI's suffix (up to 64 characters of any kind) as a model id's: lower case, letters,
    digits, '_' and '-', 40 at most. The suffix as given is kept in the job's record."""
    if suffix is None:
        return None
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", suffix.lower()).strip("-_")[:40].strip("-_")
    if not cleaned:
        raise errors.BadRequest(f"suffix {suffix!r} has no letters or digits to name a model with", param="suffix")
    return cleaned
