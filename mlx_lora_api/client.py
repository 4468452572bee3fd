"""A Python client for a running service: a thin layer over httpx that speaks the server's own
msgspec types (`types.py`, `web/bodies.py`), so there is one copy of every schema.

    from mlx_lora_api.client import Client

    api = Client("http://127.0.0.1:8000")
    job = api.finetune("default", ["The mayor of Zorbington is Elara Quintfeather."], epochs=3)
    job = api.wait(job, on_progress=lambda p: print(p.iteration, p.train_loss))
    fused = api.wait(api.fuse("default", job.model_id))
    print(api.generate(fused.model_id, messages=[{"role": "user", "content": "Who is the mayor?"}]))

Errors are `ApiError`s with the HTTP status and the server's message; `wait` raises `JobFailed`
(an `ApiError` too) when the job ends other than in success. No MLX is loaded here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec

from .types import DatasetCheck, Job, JobList, Message, Metrics, ModelRecord, Progress, SampleIn
from .web.bodies import Accepted, ErrorBody, GenerateResponse, ModelList

T = TypeVar("T")
URL_VARIABLE = "MLX_LORA_API_URL"
DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """The server refused or failed a request: `status` (HTTP) and its `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class JobFailed(ApiError):
    """A job ended failed, cancelled or paused; `job` is how it ended."""

    def __init__(self, job: Job):
        super().__init__(409 if job.status in ("cancelled", "paused") else 500, job.error or job.message or job.status)
        self.job = job


class Client:
    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0, **httpx_options: Any
    ):
        """`base_url`: the server (default: `MLX_LORA_API_URL`, else http://127.0.0.1:8000);
        `api_key`: the server's key, if it has one (default: `MLX_LORA_API_API_KEY`)."""
        self.base_url = (base_url or os.environ.get(URL_VARIABLE) or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("MLX_LORA_API_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, **httpx_options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- jobs ------------------------------------------------------------------------------

    def finetune(
        self,
        base_model: str,
        training_data: Sequence[SampleIn | dict[str, Any]],
        *,
        validation_data: Sequence[SampleIn | dict[str, Any]] | None = None,
        suffix: str | None = None,
        **parameters: Any,
    ) -> Job:
        """Queue a fine-tune; `parameters` are README's (learning_rate=1e-4, epochs=3, rank=16, ...)."""
        body: dict[str, Any] = {
            "base_model": base_model,
            "training_data": list(training_data),
            "parameters": parameters,
        }
        if validation_data is not None:
            body["validation_data"] = list(validation_data)
        if suffix is not None:
            body["suffix"] = suffix
        return self.submit_finetune(body)

    def submit_finetune(self, body: dict[str, Any]) -> Job:
        """Queue a fine-tune from a whole request body, as `POST /lora-finetune` takes it."""
        return self._queued("/lora-finetune", body)

    def check_dataset(self, body: dict[str, Any]) -> DatasetCheck:
        """What a fine-tune (a whole request body) would train on and cost; queues nothing."""
        return self._call("POST", "/datasets/check", json=body, type=DatasetCheck)

    def fuse(self, base_model: str, adapter: str, *, suffix: str | None = None, dequantize: bool = False) -> Job:
        body: dict[str, Any] = {"base_model": base_model, "lora_adapter": adapter, "dequantize": dequantize}
        if suffix is not None:
            body["suffix"] = suffix
        return self._queued("/lora-fuse", body)

    def quantize(self, model_id: str, bits: int = 4, group_size: int = 64, suffix: str | None = None) -> Job:
        body = {"bits": bits, "group_size": group_size, **({"suffix": suffix} if suffix else {})}
        return self._queued(f"/models/{model_id}/quantize", body)

    def export(self, model_id: str, format: str = "gguf") -> Job:
        return self._queued(f"/models/{model_id}/export", {"format": format})

    def push(self, model_id: str, repo_id: str, private: bool = True, commit_message: str | None = None) -> Job:
        body: dict[str, Any] = {"repo_id": repo_id, "private": private}
        if commit_message is not None:
            body["commit_message"] = commit_message
        return self._queued(f"/models/{model_id}/push", body)

    def job(self, job_id: str | Job) -> Job:
        return self._call("GET", f"/jobs/{_job_id(job_id)}", type=Job)

    def jobs(self, limit: int = 20, status: str | None = None) -> list[Job]:
        """The newest `limit` jobs (of a `status`, if given)."""
        found: list[Job] = []
        before: int | None = None
        while len(found) < limit:
            params: dict[str, Any] = {"limit": min(limit - len(found), 100)}
            if status:
                params["status"] = status
            if before is not None:
                params["before"] = before
            page = self._call("GET", "/jobs", params=params, type=JobList)
            found.extend(page.jobs)
            if page.next_before is None:
                break
            before = page.next_before
        return found

    def cancel(self, job_id: str | Job) -> Job:
        return self._call("POST", f"/jobs/{_job_id(job_id)}/cancel", type=Job)

    def pause(self, job_id: str | Job) -> Job:
        return self._call("POST", f"/jobs/{_job_id(job_id)}/pause", type=Job)

    def resume(self, job_id: str | Job) -> Job:
        return self._call("POST", f"/jobs/{_job_id(job_id)}/resume", type=Job)

    def metrics(self, job_id: str | Job) -> Metrics:
        return self._call("GET", f"/jobs/{_job_id(job_id)}/metrics", type=Metrics)

    def events(self, job_id: str | Job, after: int = 0) -> Iterator[dict[str, Any]]:
        """The job's events as they happen (past ones first, from after event number `after`);
        the iterator ends with the job. Each is a dict with `type` and `seq`."""
        headers = {"Last-Event-ID": str(after)} if after else {}
        url = f"/jobs/{_job_id(job_id)}/events"
        with self._http.stream("GET", url, headers=headers, timeout=httpx.Timeout(None, connect=10)) as response:
            _raise_for(response, response.read() if response.is_error else b"")
            data: list[str] = []
            for line in response.iter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield json.loads("\n".join(data))
                    data = []

    def wait(
        self,
        job_id: str | Job,
        on_progress: Callable[[Progress], None] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        check: bool = True,
    ) -> Job:
        """Follow a job to its end; `on_progress` gets its progress at every training report and
        evaluation, `on_event` every event. Returns the job as it ended; with `check`, a job that
        did not succeed raises `JobFailed`."""
        ident = _job_id(job_id)
        last = None
        for event in self.events(ident):
            if on_event:
                on_event(event)
            if on_progress and event["type"] in ("train", "val", "retention"):
                progress = self.job(ident).progress
                # Events read late can find the progress already past them: each state once.
                state = msgspec.structs.replace(progress, elapsed_seconds=None, eta_seconds=None)
                if state != last:
                    on_progress(progress)
                    last = state
        job = self.job(ident)
        if check and job.status != "success":
            raise JobFailed(job)
        return job

    # -- models ----------------------------------------------------------------------------

    def models(self, kind: str | None = None, base: str | None = None) -> list[ModelRecord]:
        params = {k: v for k, v in (("kind", kind), ("base", base)) if v}
        return self._call("GET", "/models", params=params, type=ModelList).models

    def model(self, model_id: str) -> ModelRecord:
        return self._call("GET", f"/models/{model_id}", type=ModelRecord)

    def import_peft(self, source: str, base_model: str | None = None, suffix: str | None = None) -> ModelRecord:
        """A Hugging Face PEFT LoRA adapter (a folder on the server's machine, or a Hub repo id) as an adapter."""
        body = {
            "source": source,
            **({"base_model": base_model} if base_model else {}),
            **({"suffix": suffix} if suffix else {}),
        }
        return self._call("POST", "/adapters/import", json=body, type=ModelRecord)

    def delete(self, model_id: str, force: bool = False) -> None:
        self._call("DELETE", f"/models/{model_id}", params={"force": "true"} if force else None)

    def generate(
        self,
        model: str = "default",
        prompt: str | None = None,
        messages: Sequence[Message | dict[str, str]] | None = None,
        **options: Any,
    ) -> str:
        """The text `model` generates (options: max_tokens, temperature, top_p, seed, stop)."""
        body = _generation(model, prompt, messages, options)
        return self._call("POST", "/generate", json=body, type=GenerateResponse).text

    def stream(
        self,
        model: str = "default",
        prompt: str | None = None,
        messages: Sequence[Message | dict[str, str]] | None = None,
        **options: Any,
    ) -> Iterator[str]:
        """`generate`, piece by piece as the model writes it."""
        body = {**_generation(model, prompt, messages, options), "stream": True}
        with self._http.stream("POST", "/generate", json=body, timeout=httpx.Timeout(None, connect=10)) as response:
            _raise_for(response, response.read() if response.is_error else b"")
            kind = None
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    event = json.loads(line[5:])
                    if kind == "text":
                        yield event["text"]
                    elif kind == "error":
                        raise ApiError(500, event.get("message", "generation failed"))

    # -- plumbing --------------------------------------------------------------------------

    def _queued(self, path: str, body: dict[str, Any]) -> Job:
        accepted = self._call("POST", path, json=body, type=Accepted)
        assert accepted.job_id is not None  # every queued job has one
        return self.job(accepted.job_id)

    def _call(self, method: str, path: str, type: type[T] | None = None, **kwargs: Any) -> T:
        response = self._http.request(method, path, **kwargs)
        _raise_for(response, response.content)
        return msgspec.json.decode(response.content, type=type) if type is not None else None  # type: ignore[return-value]


def read_samples(path: str | os.PathLike[str]) -> list[Any]:
    """Samples from a file, as `training_data` takes them: `.json`, a list; else JSON Lines, one
    sample a line (blank lines skipped). ValueError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix == ".json":
        try:
            samples = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    else:
        samples = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    samples.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {number}: not valid JSON ({e.msg})") from None
    if not isinstance(samples, list) or not samples:
        raise ValueError(f"{path} has no samples")
    return samples


def _raise_for(response: httpx.Response, content: bytes) -> None:
    if response.status_code < 400:
        return
    try:
        message = msgspec.json.decode(content, type=ErrorBody).message
    except (msgspec.DecodeError, msgspec.ValidationError):
        message = content.decode(errors="replace")[:500] or response.reason_phrase
    raise ApiError(response.status_code, message)


def _job_id(job: str | Job) -> str:
    return job.job_id if isinstance(job, Job) else job


def _generation(model: str, prompt: str | None, messages: Any, options: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, **options}
    if prompt is not None:
        body["prompt"] = prompt
    if messages is not None:
        body["messages"] = [msgspec.to_builtins(m) if isinstance(m, Message) else m for m in messages]
    return body


__all__ = ["ApiError", "Client", "JobFailed", "read_samples"]
