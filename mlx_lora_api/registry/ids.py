"""Model ids: what a valid one is, and new ones made from a base's name."""

from __future__ import annotations

import re
import secrets
import time
import unicodedata

from .. import errors
from ..types import ID_PATTERN

ID_RE = re.compile(ID_PATTERN)
HUB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def check_id(value: str, field: str = "model_id") -> str:
    """Refuse anything that could leave its folder: separators, `..`, NUL, odd unicode."""
    if not isinstance(value, str) or len(value) > 96 or not ID_RE.match(value) or ".." in value:
        raise errors.Invalid(
            f"`{field}` {value!r} is not a valid id: use 1-96 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def slug(text: str, limit: int = 40) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return (text[:limit].strip("-")) or "model"


def new_model_id(base_ref: str, label: str) -> str:
    name = base_ref.rstrip("/").rsplit("/", 1)[-1]
    return f"{slug(name)}-{label}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
