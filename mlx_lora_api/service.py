"""What the API does, without HTTP: check a request against the registry, queue it, report.

The web layer decodes and encodes; the CLI calls the same checks before training in-process.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from . import errors, openai_jobs, registry
from .accel import blas
from .config import Settings
from .jobs import cluster, estimate
from .jobs.generation import Generator
from .jobs.probe import Probe
from .jobs.runner import Runner
from .jobs.store import JobStore, new_job_id
from .jobs.worker import work_name
from .registry import Registry, hub, lock
from .registry.uploads import FileStore, Limits
from .tasks.checks import GGUF_ARCHITECTURES
from .types import (
    FINISHED,
    AdapterImportRequest,
    BaseModel,
    DatasetCheck,
    ExportRequest,
    ExportSpec,
    FileRecord,
    FinetuneRequest,
    FinetuneSpec,
    FuseRequest,
    FuseSpec,
    GenerateRequest,
    Job,
    JobList,
    JobSpec,
    Metrics,
    ModelKind,
    ModelRecord,
    PushRequest,
    PushSpec,
    QuantizeRequest,
    QuantizeSpec,
    TrainPoint,
    ValPoint,
    checkpoint_file,
    sample_texts,
)

log = logging.getLogger("mlx_lora_api")

# An adapter's checkpoint: `ADAPTER:step-N` (OpenAI's `fine_tuned_model_checkpoint`) or `ADAPTER@N`.
CHECKPOINT_REF = re.compile(r"(?P<model>[a-z0-9][a-z0-9._-]*)(?::step-|@)(?P<step>[0-9]{1,9})")


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = Registry(settings.data_dir, settings.default_model, settings.model_roots)
        self._store: JobStore | None = None  # with the runner, from start() on (the CLI has neither)
        self._runner: Runner | None = None
        self.generator = Generator(settings.generation_budget_bytes, settings.max_concurrent_generations)
        self.probe = Probe()
        self.tokenizers = estimate.Tokenizers()
        self.calibration = estimate.Calibration(settings.data_dir / estimate.CALIBRATION_FILE)
        self.files = FileStore(settings.data_dir / "files")
        self.upload_limits = Limits(settings.max_body_bytes, settings.max_samples, settings.max_sample_chars)
        self.cluster = cluster.make_cluster(settings.ranks, settings.hostfile)  # ValueError: a bad hostfile

    # -- life ----------------------------------------------------------------------------

    def start(self) -> None:
        lock.acquire(self.settings.data_dir, "mlx-lora-api serve", self.settings.port)  # one server a folder
        blas.warn_if_slow()
        self.registry.ensure_folders()
        self._store = JobStore(self.settings.jobs_db)
        self._store.recover()
        worker_args = (str(self.settings.data_dir), self.settings.default_model, msgspec.json.encode(self.cluster))
        self._runner = Runner(self._store, worker_args)
        self._runner.start()
        if self.registry.is_model(self.settings.default_model):  # what most fine-tunes count their tokens with
            self.tokenizers.warm(str(self.registry.model_dir(self.settings.default_model)))

    def stop(self) -> None:
        self.generator.stop()
        if self._runner:
            self._runner.stop()
        if self._store:
            self._store.close()
        lock.release(self.settings.data_dir)

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise errors.Unavailable("the job store is not open: the service has not started")
        return self._store

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            raise errors.Unavailable("the job runner is not running: the service has not started")
        return self._runner

    # -- checks shared with the CLI --------------------------------------------------------

    def resolve_base(self, ref: str, field: str = "base_model") -> BaseModel:
        lookup = functools.partial(hub.lookup, timeout=self.settings.hub_timeout)
        return self.registry.resolve_base(ref, hub_lookup=lookup, field=field)

    def check_limits(self, request: FinetuneRequest) -> None:
        limits = self.settings
        samples = len(request.training_data) + len(request.validation_data or [])
        if samples > limits.max_samples:
            raise errors.Invalid(
                f"the request has {samples} samples; the limit is {limits.max_samples} (MLX_LORA_API_MAX_SAMPLES)"
            )
        for field, data in (
            ("training_data", request.training_data),
            ("validation_data", request.validation_data or []),
        ):
            for i, sample in enumerate(data):
                chars = len(sample) if isinstance(sample, str) else sum(map(len, sample_texts(sample)))
                if chars > limits.max_sample_chars:
                    raise errors.Invalid(
                        f"`{field}[{i}]` has {chars} characters; the limit is {limits.max_sample_chars}"
                        " (MLX_LORA_API_MAX_SAMPLE_CHARS)"
                    )
        if request.parameters.max_seq_length > limits.max_seq_length_limit:
            raise errors.Invalid(
                f"`parameters.max_seq_length` is {request.parameters.max_seq_length}; the limit is "
                f"{limits.max_seq_length_limit} (MLX_LORA_API_MAX_SEQ_LENGTH_LIMIT)"
            )

    def finetune_spec(self, request: FinetuneRequest) -> FinetuneSpec:
        self.check_limits(request)
        base = self.resolve_base(request.base_model)
        layers = self.registry.num_layers(base)
        wanted = request.parameters.num_layers
        if layers is not None and wanted is not None and wanted > layers:
            raise errors.Invalid(f"`parameters.num_layers` is {wanted} but {base.ref} has {layers} layers")
        ranks = request.parameters.ranks
        if ranks is not None and ranks > self.cluster.ranks:
            raise errors.Invalid(
                f"`parameters.ranks` is {ranks} but this server runs fine-tunes on {self.cluster.ranks}"
                " (start it with --ranks N or --hostfile FILE)",
                param="parameters.ranks",
            )
        label = f"{request.suffix}" if request.suffix else "lora"
        report = self._estimate_at_submission(request, base)
        spec = FinetuneSpec(
            job_id=new_job_id(),
            model_id=self._fresh_id(base.ref, label),
            base=base,
            request=request,
            data=request.data_summary,  # hashed once, here
            estimate=report,
        )
        if request.resume_from:
            adapter, weights = self._resume_source(request, base, layers)
            spec = msgspec.structs.replace(spec, adapter=adapter, initial_weights=weights)
        return spec

    def check_dataset(self, request: FinetuneRequest) -> DatasetCheck:
        """POST /datasets/check: what the fine-tune will train on and cost (jobs/estimate.py)."""
        self.check_limits(request)
        base = self.resolve_base(request.base_model)
        if base.path is None:
            raise errors.Conflict(
                f"`base_model` {base.ref!r} is not on this machine yet: its tokenizer counts the tokens;"
                " a fine-tune on it fetches it"
            )
        self.probe.result()  # this machine's first measurement, where no fine-tune has finished yet
        try:
            return self._estimate(request, base)
        except (OSError, ValueError, KeyError) as e:
            raise errors.Invalid(f"the data cannot be counted with {base.ref!r}'s tokenizer: {e}") from e

    def _estimate(self, request: FinetuneRequest, base: BaseModel) -> DatasetCheck:
        assert base.path is not None
        worker = self.probe.known() or {}  # at submission, no worker is started just to ask
        device = worker.get("device", "cpu")
        gflops = worker.get("matmul_gflops")
        rate, source = self.calibration.rate(device, gflops * 1e9 if gflops else None)
        memory = self.settings.memory_limit or estimate.machine_memory()
        levers = os.environ.get("MLX_LORA_API_LEVERS", "on").strip().lower() != "off"
        retention_cached = any(self.registry.retention_cache.glob("*.json"))
        return estimate.check(
            request,
            Path(base.path),
            self.tokenizers.get(base.path),
            device,
            rate,
            source,
            memory,
            cpu_levers=levers and device == "cpu",
            retention_cached=retention_cached,
        )

    def _estimate_at_submission(self, request: FinetuneRequest, base: BaseModel) -> DatasetCheck | None:
        """The estimate, where the base is on this machine; a 422 with its figures where the peak
        would be over the machine's memory (unless `force`). An estimate that cannot be made
        does not stop the job: training finds the same problem and says so."""
        if base.path is None:
            return None
        try:
            report = self._estimate(request, base)
            if not report.fits and self.probe.known() is None:  # on a GPU the weights keep their own type
                self.probe.result()
                report = self._estimate(request, base)
        except Exception:
            log.exception("no estimate for a fine-tune on %s", base.ref)
            return None
        if not report.fits and not request.force:
            gib = 1 << 30
            raise errors.Invalid(
                f"this fine-tune is estimated to need {report.estimated_peak_memory_bytes / gib:.1f} GiB at its"
                f" peak and the machine has {report.memory_bytes / gib:.1f} GiB ({report.steps} steps, longest"
                f" sample {report.longest} tokens, batch_size {request.parameters.batch_size}): lower"
                " `parameters.batch_size`, `max_seq_length` or `num_layers`, or set `force`: true to queue it anyway"
                " (POST /datasets/check gives every figure)",
                param="force",
            )
        return report

    def _resume_source(self, request: FinetuneRequest, base: BaseModel, layers: int | None) -> tuple[str, str]:
        """The adapter `resume_from` names and its weights file (or its checkpoint's); it must be
        of this base and have the LoRA shape the request asks for."""
        ref = request.resume_from or ""
        match = CHECKPOINT_REF.fullmatch(ref)
        adapter = match["model"] if match else ref
        if not self.registry.is_adapter(adapter):
            raise errors.NotFound(f"`resume_from`: no adapter {adapter!r}", param="resume_from")
        folder = self.registry.adapter_dir(adapter)
        weights = folder / (f"checkpoints/{checkpoint_file(int(match['step']))}" if match else "adapters.safetensors")
        if not weights.is_file():
            raise errors.NotFound(f"`resume_from`: {ref!r} has no such checkpoint", param="resume_from")
        trained_on = self.adapter_base(adapter)
        if trained_on != base.ref:
            raise errors.Invalid(
                f"`resume_from`: {adapter!r} was trained on {trained_on!r}, not on {base.ref!r}", param="resume_from"
            )
        config = registry.read_json(folder / "adapter_config.json")
        params = request.parameters
        lora = config.get("lora_parameters", {})
        lora_kind = params.fine_tune_type != "full"
        wanted = {
            "fine_tune_type": params.fine_tune_type,
            "rank": params.rank if lora_kind else None,
            "num_layers": min(16, layers or 16) if params.num_layers is None else params.num_layers,
            "scale": params.lora_scale if lora_kind else None,  # an imported PEFT adapter's may differ
        }
        if wanted["num_layers"] == -1 and layers:
            wanted["num_layers"] = layers
        has = {
            "fine_tune_type": config.get("fine_tune_type", "lora"),
            "rank": lora.get("rank") if config.get("fine_tune_type", "lora") != "full" else None,
            "num_layers": config.get("num_layers"),
            "scale": lora.get("scale") if config.get("fine_tune_type", "lora") != "full" else None,
        }
        if differs := [k for k in wanted if wanted[k] != has[k]]:
            asked = ", ".join(f"{k} {wanted[k]}" for k in differs)
            theirs = ", ".join(f"parameters.{k}={json.dumps(has[k])}" for k in differs)
            raise errors.Invalid(
                f"`resume_from`: {adapter!r} has another shape than this request asks ({asked}); set {theirs}",
                param="resume_from",
            )
        return adapter, str(weights)

    def fuse_spec(self, request: FuseRequest) -> FuseSpec:
        base = self.resolve_base(request.base_model)
        adapter, _, step = request.lora_adapter.partition("@")
        trained_on = self.adapter_base(adapter)
        if trained_on != base.ref:
            raise errors.Conflict(
                f"adapter {adapter!r} was trained on {trained_on!r}, not on {base.ref!r}"
                f" (`base_model` {request.base_model!r})"
            )
        if step:  # a checkpoint of a finished adapter
            if not self.registry.is_adapter(adapter):
                raise errors.Conflict(f"`lora_adapter`: {adapter!r} is still being made; fuse its checkpoints after")
            folder = self.registry.adapter_dir(adapter)
            if not (folder / "checkpoints" / checkpoint_file(int(step))).is_file():
                steps = registry.checkpoint_steps(folder)
                raise errors.NotFound(
                    f"`lora_adapter`: {adapter!r} has no checkpoint at iteration {step};"
                    f" it has {', '.join(map(str, steps)) or 'none'}"
                )
        label = f"{request.suffix}" if request.suffix else "fused"
        return FuseSpec(
            job_id=new_job_id(),
            model_id=self._fresh_id(base.ref, label),
            base=base,
            adapter=adapter,
            request=request,
            checkpoint=int(step) if step else None,
        )

    def _existing_model(self, model_id: str) -> BaseModel:
        """A finished model or adapter of the registry, for the jobs that act on one."""
        self._refuse_if_in_the_making(model_id)
        record = self.registry.record(model_id)
        parent = self.registry.adapters_dir if record.kind == "adapter" else self.registry.models_dir
        return BaseModel(ref=model_id, source="registry", path=str(parent / model_id))

    def _folder(self, model_id: str) -> Path:
        record = self.registry.record(model_id)
        return (self.registry.adapters_dir if record.kind == "adapter" else self.registry.models_dir) / model_id

    def _refuse_if_in_the_making(self, model_id: str) -> None:
        if self._store and any(
            j.kind in ("finetune", "fuse", "quantize") for j in self.store.pending_for_model(model_id)
        ):
            raise errors.Conflict(f"{model_id!r} is still being made; try again when its job has finished")

    def quantize_spec(self, model_id: str, request: QuantizeRequest) -> QuantizeSpec:
        source = self._existing_model(model_id)
        record = self.registry.record(model_id)
        if record.kind == "adapter":
            raise errors.Invalid(f"{model_id!r} is an adapter; quantize its base or a fused model")
        if record.quantization or registry.read_json(self._folder(model_id) / "config.json").get("quantization"):
            raise errors.Invalid(f"{model_id!r} is already quantized")
        label = request.suffix or f"q{request.bits}"
        return QuantizeSpec(job_id=new_job_id(), model_id=self._fresh_id(model_id, label), base=source, request=request)

    def export_spec(self, model_id: str, request: ExportRequest) -> ExportSpec:
        source = self._existing_model(model_id)
        record = self.registry.record(model_id)
        if record.kind == "adapter":
            return self._adapter_export_spec(model_id, source, record, request)
        if request.format == "peft":
            raise errors.Invalid(f"{model_id!r} is a {record.kind} model; PEFT export is for adapters", param="format")
        self._check_gguf_exportable(model_id, self._folder(model_id))
        return ExportSpec(job_id=new_job_id(), model_id=model_id, base=source, request=request)

    def _check_gguf_exportable(self, model_id: str, folder: Path) -> None:
        config = registry.read_json(folder / "config.json")
        if config.get("model_type") not in GGUF_ARCHITECTURES:
            raise errors.Invalid(
                f"GGUF export handles {', '.join(GGUF_ARCHITECTURES)} models; "
                f"{model_id!r} is {config.get('model_type')!r}"
            )
        if config.get("quantization"):
            raise errors.Invalid(f"{model_id!r} is quantized; GGUF export needs float weights")

    def _adapter_export_spec(
        self, model_id: str, source: BaseModel, record: ModelRecord, request: ExportRequest
    ) -> ExportSpec:
        """An adapter as a PEFT folder, or as a GGUF LoRA adapter for its base's GGUF export."""
        kind = registry.read_json(self._folder(model_id) / "adapter_config.json").get("fine_tune_type", "lora")
        if kind != "lora":
            raise errors.Invalid(
                f"{model_id!r} is a {kind} adapter; {request.format} export handles LoRA adapters"
                " (fuse it and export the fused model as gguf)",
                param="format",
            )
        if request.format == "peft":
            chain = self.lineage(model_id)
            base_name = next((r["hub_id"] for r in chain[1:] if r.get("hub_id")), record.base_model)
            return ExportSpec(job_id=new_job_id(), model_id=model_id, base=source, request=request, base_name=base_name)
        base = self.resolve_base(record.base_model or "")
        if base.path is None:
            raise errors.Invalid(f"the base of {model_id!r}, {base.ref!r}, is not on this machine", param="format")
        self._check_gguf_exportable(base.ref, Path(base.path))
        return ExportSpec(job_id=new_job_id(), model_id=model_id, base=source, request=request, adapter_base=base)

    def import_peft(self, request: AdapterImportRequest) -> ModelRecord:
        """A Hugging Face PEFT LoRA adapter (a folder, or a Hub repo id) as an adapter of the registry."""
        from .registry import peft  # numpy and safetensors: only for an import
        from .tasks.import_peft import PeftImportError

        source = request.source
        hub_id = None
        if source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().is_dir():
            folder = Path(source).expanduser().resolve()
            if not any(folder.is_relative_to(root) for root in self.registry.model_roots):
                roots = ", ".join(str(r) for r in self.registry.model_roots)
                raise errors.Forbidden(f"`source` folder {source!r} is outside the allowed model roots ({roots})")
            if not folder.is_dir():
                raise errors.NotFound(f"`source` folder {source!r} does not exist")
        elif registry.HUB_RE.match(source):
            folder, hub_id = Path(hub.adapter_path(source)), source
        else:
            raise errors.Invalid(f"`source` {source!r} is neither a folder nor a Hugging Face repo id", param="source")
        try:
            config = json.loads((folder / "adapter_config.json").read_text())
        except FileNotFoundError as e:
            raise errors.NotFound(f"`source` {source!r} has no adapter_config.json: it is not a PEFT adapter") from e
        except ValueError as e:
            raise errors.Invalid(f"`source`: adapter_config.json is not valid JSON ({e})", param="source") from e
        named = request.base_model or config.get("base_model_name_or_path")
        if not named:
            raise errors.Invalid(
                "the adapter's config names no base (`base_model_name_or_path`): give `base_model`", param="base_model"
            )
        base = self._base_for(named)
        if base.path is None:
            raise errors.Invalid(
                f"`base_model` {base.ref!r} is not on this machine yet: import it, or fine-tune on it once",
                param="base_model",
            )
        model_id = self._fresh_id(base.ref, request.suffix or "peft")
        try:
            peft.register(folder, self.registry, model_id, base, f"peft:{source}", hub_id)
        except PeftImportError as e:
            raise errors.Invalid(f"`source`: {e}", param="source") from e
        return self.registry.record(model_id)

    def _base_for(self, named: str) -> BaseModel:
        """A base by reference; a Hub id is first looked for among the registry's models imported from it."""
        if registry.HUB_RE.match(named) and not self.registry.is_model(named):
            for record in self.registry.list_models():
                meta = registry.read_meta(self.registry.models_dir / record.model_id) if record.kind == "base" else None
                if meta is not None and meta.hub_id == named:
                    return BaseModel(
                        ref=record.model_id, source="registry", path=str(self.registry.models_dir / record.model_id)
                    )
        return self.resolve_base(named)

    def push_spec(self, model_id: str, request: PushRequest) -> PushSpec:
        source = self._existing_model(model_id)
        hub.check_repo_id(request.repo_id)
        if not hub.token():
            # Not 401: the caller's API key is fine; the server's own Hub credential is missing.
            raise errors.Unavailable(
                "this server has no Hugging Face token to push with (your API key is not the problem): set HF_TOKEN "
                "in the server's environment, or run `hf auth login` on its machine, then restart the service"
            )
        lineage = self.lineage(model_id)
        base_hub_id = next((r.get("hub_id") for r in lineage if r.get("hub_id")), None)
        license = next((r.get("license") for r in lineage if r.get("license")), None)
        card = hub.model_card(model_id, request.repo_id, lineage, base_hub_id, license)
        return PushSpec(job_id=new_job_id(), model_id=model_id, base=source, request=request, card=card)

    def lineage(self, model_id: str) -> list[dict]:
        """The model and what it came from (adapter, base), as registry records plus Hub ids."""
        chain, seen, current = [], set(), model_id
        while current and current not in seen:
            seen.add(current)
            try:
                record = self.registry.record(current)
            except errors.NotFound:
                if "/" in current:  # a Hub base
                    chain.append({"model_id": current, "kind": "base", "hub_id": current})
                break
            parent = self.registry.adapters_dir if record.kind == "adapter" else self.registry.models_dir
            meta = registry.read_meta(parent / current)
            entry = msgspec.to_builtins(record)
            entry.update(hub_id=meta.hub_id if meta else None, license=meta.license if meta else None)
            chain.append(entry)
            current = record.adapter or record.base_model or ""
        return chain

    def adapter_base(self, adapter_id: str) -> str:
        """The base an adapter was (or is being) trained on."""
        registry.check_id(adapter_id, "lora_adapter")
        if self.registry.is_adapter(adapter_id):
            meta = registry.read_meta(self.registry.adapter_dir(adapter_id))
            if meta and meta.base_model:
                return meta.base_model
            config = registry.read_json(self.registry.adapter_dir(adapter_id) / "adapter_config.json")
            return str(config.get("model", ""))
        if self._store:
            for job in self._store.pending_for_model(adapter_id):
                if job.kind == "finetune":
                    return job.base_model
        adapters = [r.model_id for r in self.registry.list_models(kind="adapter")]
        raise errors.NotFound(
            f"`lora_adapter` {adapter_id!r} is neither an adapter nor the output of a queued fine-tune; "
            f"adapters: {', '.join(adapters) if adapters else 'none yet'}"
        )

    def _fresh_id(self, base_ref: str, label: str) -> str:
        while True:
            model_id = registry.new_model_id(base_ref, label)
            if not self.registry.taken(model_id) and not (self._store and self._store.pending_for_model(model_id)):
                return model_id

    # -- generation ---------------------------------------------------------------------

    def generation_target(self, model: str) -> dict[str, str | None]:
        """The base folder and adapter folder a `model` reference stands for."""
        if match := CHECKPOINT_REF.fullmatch(model):
            return self._checkpoint_target(match["model"], int(match["step"]))
        self._refuse_if_in_the_making(model)
        if self.registry.is_adapter(model):
            base = self.resolve_base(self.adapter_base(model))
            if base.path is None:
                raise errors.Unavailable(f"the base of adapter {model!r}, {base.ref!r}, is not downloaded yet")
            return {"base_path": base.path, "adapter_path": str(self.registry.adapter_dir(model))}
        base = self.resolve_base(model, field="model")
        if base.path is None:
            raise errors.Unavailable(
                f"{model!r} is not downloaded yet: fine-tune it once, or fetch it with huggingface-cli"
            )
        return {"base_path": base.path, "adapter_path": None}

    @property
    def _checkpoint_views(self) -> Path:
        return self.settings.data_dir / "cache" / "checkpoints"

    def _checkpoint_target(self, model_id: str, step: int) -> dict[str, str | None]:
        """`ADAPTER:step-N`, the adapter's checkpoint at step N, while it trains too. Generation
        reads an adapter folder, so the checkpoint is shown as one: a folder in the cache with
        the adapter's config and a link to the checkpoint's weights (no copy)."""
        folder = self.registry.adapter_dir(model_id)
        job_id = self._store.maker(model_id) if self._store else None
        spec = self.store.spec(job_id) if job_id else None
        if not isinstance(spec, FinetuneSpec) and not self.registry.is_adapter(model_id):
            raise errors.NotFound(f"no adapter {model_id!r} to take a checkpoint of", param="model")
        if not self.registry.is_adapter(model_id):
            assert isinstance(spec, FinetuneSpec)
            folder = registry.staging_dir(folder, work_name(spec))  # still training, paused or stopped
        if not (folder / "checkpoints" / checkpoint_file(step)).is_file():
            steps = registry.checkpoint_steps(folder)
            raise errors.NotFound(
                f"{model_id!r} has no checkpoint at step {step}; it has {', '.join(map(str, steps)) or 'none'}",
                param="model",
            )
        base = spec.base if isinstance(spec, FinetuneSpec) else self.resolve_base(self.adapter_base(model_id))
        if base.path is None:
            raise errors.Unavailable(f"the base of {model_id!r}, {base.ref!r}, is not downloaded yet")
        view = registry.checkpoint_view(folder, step, self._checkpoint_views / f"{model_id}-step-{step}")
        return {"base_path": base.path, "adapter_path": str(view)}

    def generate(self, request: GenerateRequest) -> Iterator[dict[str, Any]]:
        """Check the request now (errors before any streaming), then return the event stream."""
        if request.max_tokens > self.settings.max_generation_tokens:
            raise errors.Invalid(
                f"`max_tokens` is {request.max_tokens}; this server allows at most "
                f"{self.settings.max_generation_tokens} (MLX_LORA_API_MAX_GENERATION_TOKENS)"
            )
        target = self.generation_target(request.model)
        messages = [{"role": m.role, "content": m.content} for m in request.messages] if request.messages else None
        call = {
            **target,
            "prompt": request.prompt,
            "messages": messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "stop": request.stop,
        }
        return self.generator.stream(call)

    def generate_text(self, request: GenerateRequest) -> tuple[str, dict[str, Any]]:
        """The whole answer at once: (text, end event)."""
        events = self.generate(request)
        chunks = []
        try:
            for event in events:
                if event["type"] == "error":
                    raise errors.ServiceError(f"generation failed: {event['message']}")
                if event["type"] == "text":
                    chunks.append(event["text"])
                else:
                    return "".join(chunks), event
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # its place goes back at once
        raise errors.ServiceError("generation ended without an answer")

    # -- models -------------------------------------------------------------------------

    def list_models(self, kind: str | None = None, base: str | None = None) -> list[ModelRecord]:
        """The registry's models, and the ones jobs are making (status queued or running)."""
        kinds: dict[str, ModelKind] = {"finetune": "adapter", "fuse": "fused", "quantize": "base"}
        coming = [
            ModelRecord(
                job.model_id,
                kinds[job.kind],
                job.created_at,
                0,
                "running" if job.status == "running" else "queued",  # pending_outputs: one or the other
                base_model=job.base_model,
                job_id=job.job_id,
            )
            for job in self.store.pending_outputs()
        ]
        coming = [r for r in coming if (not kind or r.kind == kind) and (not base or r.base_model == base)]
        return sorted(coming, key=lambda r: r.created_at, reverse=True) + self.registry.list_models(kind, base)

    def delete_model(self, model_id: str, force: bool = False) -> None:
        self.registry.record(model_id)  # 404 first
        if jobs := self.store.pending_users(model_id):
            raise errors.Conflict(f"{model_id!r} is in use by queued or running jobs: {', '.join(jobs)}")
        if (dependents := self.registry.dependents(model_id)) and not force:
            raise errors.Conflict(
                f"{model_id!r} is the base or adapter of {', '.join(dependents)}; "
                "delete with ?force=true to remove it anyway"
            )
        self.registry.delete(model_id)
        for view in self._checkpoint_views.glob(f"{model_id}-step-*"):
            shutil.rmtree(view, ignore_errors=True)  # its checkpoints shown as models

    def metrics(self, job_id: str) -> Metrics:
        events = self.events(job_id)
        train = [msgspec.convert(e, TrainPoint) for e in events if e["type"] == "train"]
        val = [msgspec.convert(e, ValPoint) for e in events if e["type"] == "val"]
        return Metrics(job_id, train, val)

    # -- health -------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What /health reports: each check, what is wrong, and what a worker finds (versions,
        device, BLAS)."""
        problems = []
        if self._runner is None or not self._runner.alive():
            problems.append("the job runner is not running: queued jobs will not start")
        try:
            self.store.check_writable()
        except (sqlite3.Error, errors.ServiceError) as e:
            problems.append(f"the job database cannot be written: {e}")
        worker = self.probe.result()
        if not worker["ok"]:
            problems.append(worker["error"])
        details = {k: v for k, v in worker.items() if k not in ("ok", "error")}
        return {"problems": problems, **details}

    # -- jobs ----------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> Job:
        if self.store.count("queued") >= self.settings.max_queued_jobs:
            raise errors.TooManyJobs(
                f"{self.settings.max_queued_jobs} jobs are already queued; try again later",
                headers={"Retry-After": "60"},
            )
        job = self.store.add(spec)
        self.runner.wake()
        return job

    def job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise errors.NotFound(f"no job with id {job_id!r}")
        return job

    def job_details(self, job_id: str) -> Job:
        """The job as `GET /jobs/{id}` shows it: a fine-tune with its parameters and a summary of its
        data (read from its spec; the polling loops use `job`, which does not)."""
        job = self.job(job_id)
        spec = self.store.spec(job_id)
        if isinstance(spec, FinetuneSpec):
            job.parameters = msgspec.to_builtins(spec.request.parameters)
            job.training_data = spec.data or spec.request.data_summary  # jobs queued before `data` existed
        return job

    def jobs(self, limit: int, before: int | None, status: str | None) -> JobList:
        return self.store.page(limit=limit, before=before, status=status)

    def cancel(self, job_id: str, pause: bool = False) -> Job:
        """Stop a job; with `pause`, it is `paused` rather than `cancelled` (either can be resumed,
        a fine-tune from its last checkpoint)."""
        had = self.store.request_cancel(job_id, pause)
        if had is None:
            raise errors.NotFound(f"no job with id {job_id!r}")
        if had in FINISHED:
            raise errors.Conflict(f"job {job_id} has already ended ({had})")
        if had == "running":
            self.runner.cancel(job_id)
        return self.job(job_id)

    def resume(self, job_id: str) -> Job:
        """Queue a failed, cancelled or paused job again; a fine-tune goes on from its last checkpoint."""
        job = self.job(job_id)
        if job.status not in ("failed", "cancelled", "paused"):
            raise errors.Conflict(f"job {job_id} is {job.status}; only failed, cancelled or paused jobs can be resumed")
        if self.registry.taken(job.model_id) and job.kind in ("finetune", "fuse", "quantize"):
            raise errors.Conflict(f"{job.model_id!r} exists now; delete it before resuming job {job_id}")
        spec = self.store.spec(job_id)
        where = "the start"
        if isinstance(spec, FinetuneSpec):
            folder = registry.staging_dir(self.registry.adapter_dir(spec.model_id), work_name(spec))
            if registry.has_checkpoints(folder):
                where = f"its last checkpoint in {folder}"
        self.store.requeue(job_id, f"resumed from {where}")
        self.runner.wake()
        return self.job(job_id)

    def all_events(self, after: int) -> list[dict]:
        return self.store.all_events(after)

    def latest_event(self) -> int:
        return self.store.latest_event()

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        self.job(job_id)
        return self.store.events(job_id, after)

    # -- OpenAI's fine-tuning API: files, and jobs created from them -----------------------

    def add_file(self, data: bytes, filename: str, purpose: str) -> FileRecord:
        return self.files.add(data, filename, purpose, self.upload_limits)

    def openai_finetune(self, create: openai_jobs.JobCreate) -> Job:
        """Queue the fine-tune that an OpenAI-style request asks for (openai_jobs.build)."""
        request, origin = openai_jobs.build(create, self.files, self.upload_limits)
        try:
            spec = self.finetune_spec(request)
        except errors.ServiceError as e:
            e.param = e.param or ("model" if "base_model" in e.message else None)
            raise
        return self.submit(msgspec.structs.replace(spec, openai=origin))

    def finetune_jobs(
        self, limit: int, after: str | None = None, metadata: dict[str, str] | None = None
    ) -> tuple[list[tuple[Job, FinetuneSpec]], bool]:
        """Fine-tune jobs, newest first, those after the job `after` in that order, whose OpenAI
        metadata has every pair in `metadata`; and whether there are more."""
        before = None
        if after is not None:
            before = self.store.seq(after)
            if before is None:
                raise errors.NotFound(f"no job with id {after!r}", param="after")
        found: list[tuple[Job, FinetuneSpec]] = []
        while True:
            page = self.store.page(limit=max(limit, 20), before=before, kind="finetune")
            for job in page.jobs:
                spec = self.store.spec(job.job_id)
                if not isinstance(spec, FinetuneSpec):
                    continue
                have = spec.openai.metadata if spec.openai else {}
                if all(have.get(k) == v for k, v in (metadata or {}).items()):
                    if len(found) == limit:
                        return found, True
                    found.append((job, spec))
            if page.next_before is None:
                return found, False
            before = page.next_before

    def finetune_job(self, job_id: str) -> tuple[Job, FinetuneSpec]:
        job = self.job(job_id)
        spec = self.store.spec(job_id)
        if not isinstance(spec, FinetuneSpec):
            raise errors.NotFound(f"job {job_id!r} is a {job.kind} job, not a fine-tune")
        return job, spec
