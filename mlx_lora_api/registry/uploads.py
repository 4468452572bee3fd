"""Data files uploaded for fine-tuning (OpenAI's Files API): JSONL checked line by line before it
is kept, then kept in `DATA_DIR/files/` as `<id>.jsonl` beside `<id>.json`, its record. Both are
written to a temporary name and renamed into place, the record last: a file is listed only once
it is whole, and a failed upload leaves nothing behind.

Every line is one sample in a format the service trains on, the same types as `training_data`:
a JSON string or `{"text"}`, `{"prompt", "completion"}`, `{"messages"}`, or a preference row
(OpenAI's `{"input", "preferred_output", "non_preferred_output"}`, or `{"prompt", "chosen",
"rejected"}`). One format per file. Errors name the line and the field:
`line 17: messages[1].role: invalid value 'bot'; expected one of system, user, assistant, tool`.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import msgspec

from .. import errors
from ..types import FileRecord, Sample, SampleIn, sample_form, sample_texts

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
PURPOSES = ("fine-tune",)
_line_decoder = msgspec.json.Decoder()
_PATH = re.compile(r"^(.*) - at `\$\.?(.*)`$", re.S)


class Limits(msgspec.Struct, frozen=True):
    max_bytes: int
    max_samples: int
    max_sample_chars: int


def parse(data: bytes, limits: Limits) -> tuple[list[Any], str]:
    """The samples of a JSONL file and their one format; `errors.Invalid` naming the line."""
    if len(data) > limits.max_bytes:
        raise errors.PayloadTooLarge(f"the file is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.Invalid(f"the file is not UTF-8 text (byte {e.start})", param="file") from e
    samples: list[Any] = []
    form = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(samples) == limits.max_samples:
            raise errors.Invalid(
                f"line {number}: the file has more than {limits.max_samples} samples (MLX_LORA_API_MAX_SAMPLES)",
                param="file",
            )
        sample = _sample(line, number)
        kind = sample_form(sample)
        if form is None:
            form = kind
        elif kind != form:
            raise errors.Invalid(
                f"line {number}: a {kind} sample in a file of {form} samples; use one format per file", param="file"
            )
        chars = sum(map(len, _texts(sample)))
        if chars > limits.max_sample_chars:
            raise errors.Invalid(
                f"line {number}: {chars} characters; the limit is {limits.max_sample_chars}"
                " (MLX_LORA_API_MAX_SAMPLE_CHARS)",
                param="file",
            )
        samples.append(sample)
    if form is None:
        raise errors.Invalid("the file has no samples: one JSON object per line", param="file")
    return samples, form


def _sample(line: str, number: int) -> SampleIn:
    try:
        value = _line_decoder.decode(line)
    except msgspec.DecodeError as e:
        raise errors.Invalid(f"line {number}: not valid JSON ({e})", param="file") from e
    if isinstance(value, str):
        if not value.strip():
            raise errors.Invalid(f"line {number}: the text is empty or blank", param="file")
        return value
    if not isinstance(value, dict):
        raise errors.Invalid(
            f"line {number}: a {type(value).__name__}; each line must be a JSON object (or a string)", param="file"
        )
    try:
        sample = msgspec.convert(value, Sample)
    except msgspec.ValidationError as e:
        raise errors.Invalid(f"line {number}: {_where(str(e))}", param="file") from e
    if any(not t.strip() for t in sample_texts(sample)):
        raise errors.Invalid(f"line {number}: a text is empty or blank", param="file")
    return sample


def _where(message: str) -> str:
    """msgspec's "Expected `str`, got `int` - at `$.messages[1].role`" as "messages[1].role: ..."."""
    match = _PATH.match(message)
    what, path = match.groups() if match else (message, "")
    what = what[0].lower() + what[1:]
    if what.startswith("invalid enum value") and path.endswith(".role"):
        what += "; expected one of system, user, assistant, tool"
    return f"{path}: {what}" if path else what


def _texts(sample: SampleIn) -> list[str]:
    return [sample] if isinstance(sample, str) else sample_texts(sample)


class FileStore:
    """The uploaded files of one data folder."""

    def __init__(self, folder: Path):
        self.folder = folder

    def add(self, data: bytes, filename: str, purpose: str, limits: Limits) -> FileRecord:
        if purpose not in PURPOSES:
            raise errors.Invalid(f"purpose {purpose!r} is not supported; use {', '.join(PURPOSES)}", param="purpose")
        samples, form = parse(data, limits)
        record = FileRecord(
            file_id=f"file-{secrets.token_hex(12)}",
            filename=filename,
            purpose=purpose,
            bytes=len(data),
            created_at=time.time(),
            samples=len(samples),
            form=form,  # type: ignore[arg-type]  # parse returns one of FileRecord.form's values
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        _write(self.folder / f"{record.file_id}.jsonl", data)
        _write(self.folder / f"{record.file_id}.json", msgspec.json.encode(record))
        return record

    def get(self, file_id: str, param: str = "file_id") -> FileRecord:
        path = self._path(file_id, ".json", param)
        try:
            return msgspec.json.decode(path.read_bytes(), type=FileRecord)
        except FileNotFoundError:
            raise errors.NotFound(f"no file with id {file_id!r}", param=param) from None

    def content(self, file_id: str, param: str = "file_id") -> bytes:
        self.get(file_id, param)
        return self._path(file_id, ".jsonl", param).read_bytes()

    def samples(self, file_id: str, limits: Limits, param: str = "file_id") -> tuple[list[Any], str]:
        return parse(self.content(file_id, param), limits)

    def list(self) -> list[FileRecord]:
        """Newest first."""
        records = []
        for path in self.folder.glob("file-*.json"):
            try:
                records.append(msgspec.json.decode(path.read_bytes(), type=FileRecord))
            except (FileNotFoundError, msgspec.DecodeError):
                continue  # deleted meanwhile, or not ours
        return sorted(records, key=lambda r: (r.created_at, r.file_id), reverse=True)

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        self._path(file_id, ".json", "file_id").unlink(missing_ok=True)  # unlisted first
        self._path(file_id, ".jsonl", "file_id").unlink(missing_ok=True)

    def _path(self, file_id: str, suffix: str, param: str) -> Path:
        if not FILE_ID.fullmatch(file_id):
            raise errors.NotFound(f"no file with id {file_id!r}", param=param)
        return self.folder / f"{file_id}{suffix}"


def _write(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
