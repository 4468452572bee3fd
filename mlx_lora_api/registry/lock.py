"""One server per data folder: an exclusive lock on `DATA_DIR/.lock`, held for the life of the
process that takes it.

Two servers on one folder would both recover and requeue each other's running jobs and write
the same checkpoints. The lock is the kernel's (`flock`), so it goes with the process however it
ends, SIGKILL included: no stale lock to clean up. The file says who holds it (pid, what, port),
for the message the next one gets. The CLI's in-process `train` and `fuse` take the same lock.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from .. import errors

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # folder -> the open file whose lock this process holds


class FolderInUse(errors.Conflict):
    """Another process holds the data folder."""


def acquire(data_dir: Path, holder: str, port: int | None = None) -> None:
    """Take the data folder's lock for this process (again: a no-op), or raise FolderInUse
    naming the process that has it."""
    folder = Path(data_dir).resolve()
    if folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUse(
            f"the data folder {folder} is in use by {_describe(path)}; stop it first, or use another --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "holder": holder, "port": port}).encode(), 0)
    os.fsync(fd)
    _held[folder] = fd


def holder(data_dir: Path) -> dict | None:
    """Who holds the data folder's lock (pid, holder, port), or None when no process does."""
    path = Path(data_dir).resolve() / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
    finally:
        os.close(fd)  # a shared lock taken here goes with it
    return None


def release(data_dir: Path) -> None:
    fd = _held.pop(Path(data_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the file lets the lock go


def _describe(path: Path) -> str:
    try:
        who = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        who = {}
    if not who.get("pid"):
        return "another process"
    where = f", port {who['port']}" if who.get("port") else ""
    return f"{who.get('holder', 'a process')} (pid {who['pid']}{where})"
