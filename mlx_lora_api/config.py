"""Settings, merged in one place and one order: command line over environment over defaults."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

ENV_PREFIX = "MLX_LORA_API_"


class Settings(msgspec.Struct, kw_only=True, repr_omit_defaults=True):
    data_dir: Path = Path(".")
    host: str = "127.0.0.1"
    port: int = 8000
    # Bundled model registered under this id; the alias `default` names it.
    default_model: str = "smollm2-135m-instruct"
    # Local base_model folders are accepted only below these roots (data_dir always counts).
    model_roots: list[Path] = msgspec.field(default_factory=lambda: [Path.home()])
    # Bearer key every request but /health must carry; without one the service binds only to loopback.
    api_key: str | None = None
    # Web origins (scheme://host:port) besides the service's own that may call it from a browser.
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    max_queued_jobs: int = 100
    max_body_bytes: int = 64 * 1024 * 1024
    max_samples: int = 100_000  # per fine-tune request, training and validation together
    max_sample_chars: int = 200_000  # characters in one sample
    max_seq_length_limit: int = 32_768  # the largest `max_seq_length` a request may ask for
    hub_timeout: float = 10.0
    # Memory for models loaded by /generate (0: half the machine's memory, at most 8 GiB).
    generation_budget_bytes: int = 0
    # Generations running or waiting at once; past it, 429 (each waiting one holds a server thread).
    max_concurrent_generations: int = 16
    # The largest `max_tokens` a generation request may ask for.
    max_generation_tokens: int = 4096
    # How often a `?wait=true` request and an event stream look at their job, in seconds.
    wait_poll_interval: float = 0.2
    # A comment on an event stream after this many quiet seconds, so proxies keep it open.
    sse_keepalive_seconds: float = 15.0
    # The memory a fine-tune may be estimated to need at its peak (0: the machine's); one estimated
    # over it is refused with 422 unless its request says `"force": true` (jobs/estimate.py).
    memory_limit: int = 0
    # Data-parallel fine-tunes (jobs/cluster.py): this many local ranks on loopback (ring), or the
    # hosts of MLX's hostfile (`mlx.distributed_config` writes it; with `ranks`, its first ranks).
    ranks: int = 1
    hostfile: Path | None = None

    def __repr__(self) -> str:
        return f"Settings({redacted(self)})"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def jobs_db(self) -> Path:
        return self.data_dir / "jobs.sqlite3"


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "data_dir": Path,
    "host": str,
    "port": int,
    "default_model": str,
    "model_roots": lambda v: [Path(p) for p in v.split(os.pathsep) if p],
    "api_key": str,
    "allowed_origins": lambda v: [o.strip() for o in v.split(",") if o.strip()],
    "max_queued_jobs": int,
    "max_body_bytes": int,
    "max_samples": int,
    "max_sample_chars": int,
    "max_seq_length_limit": int,
    "hub_timeout": float,
    "generation_budget_bytes": int,
    "sse_keepalive_seconds": float,
    "max_concurrent_generations": int,
    "max_generation_tokens": int,
    "memory_limit": int,
    "ranks": int,
    "hostfile": Path,
}


def load_settings(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then `MLX_LORA_API_<NAME>` variables, then `overrides` (flags) that are not None."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, convert in _CONVERTERS.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw:
            try:
                values[name] = convert(raw)
            except ValueError as e:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not valid: {e}") from e
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    settings = Settings(**values)
    settings.data_dir = settings.data_dir.expanduser().resolve()
    settings.model_roots = [p.expanduser().resolve() for p in settings.model_roots]
    return settings


def redacted(settings: Settings) -> dict:
    """The settings for logs and answers: never the API key."""
    values = {name: getattr(settings, name) for name in settings.__struct_fields__}
    if values.get("api_key"):
        values["api_key"] = "***"
    return values
