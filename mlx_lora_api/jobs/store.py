"""The durable job store (SQLite, WAL): jobs, their progress, checkpoints and events.

Every write is committed before it returns; the runner writes what workers report, the
service reads. Nothing here knows of HTTP or MLX.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from ..types import Checkpoint, Job, JobList, JobSpec, Progress, decode_spec, encode_spec, job_kind

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    model_id TEXT NOT NULL,
    base_model TEXT NOT NULL,
    spec BLOB NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    progress TEXT NOT NULL DEFAULT '{}',
    checkpoints TEXT NOT NULL DEFAULT '[]',
    message TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    interruptions INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_model ON jobs (model_id);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at REAL NOT NULL);
"""
PROGRESS_KEYS = set(Progress.__struct_fields__)
MAX_INTERRUPTIONS = 3
_COLUMNS = (
    "job_id, kind, status, model_id, base_model, created_at, started_at, finished_at, progress, checkpoints,"
    " message, error"
)


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


class JobStore:
    """Every write is committed before it returns; one connection, serialized by a lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        # Reads get a connection per thread: in WAL mode they never wait for a write's fsync.
        self._readers = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._migrate()

    def _migrate(self) -> None:
        """Columns added since the first release, for data folders made before them."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "checkpoints" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN checkpoints TEXT NOT NULL DEFAULT '[]'")
        if "interruptions" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            for connection in self._reader_connections:
                connection.close()

    def _execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _read(self, sql: str, args: tuple = ()) -> list:
        connection = getattr(self._readers, "db", None)
        if connection is None:
            connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._readers.db = connection
            with self._lock:
                self._reader_connections.append(connection)
        return connection.execute(sql, args).fetchall()

    # -- writing -------------------------------------------------------------------------

    def add(self, spec: JobSpec) -> Job:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO jobs (job_id, kind, status, model_id, base_model, spec, created_at)"
                    " VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                    (spec.job_id, job_kind(spec), spec.model_id, spec.base.ref, encode_spec(spec), now),
                )
                self._db.execute(
                    "INSERT INTO events (job_id, time, type, data) VALUES (?, ?, 'queued', '{}')", (spec.job_id, now)
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        job = self.get(spec.job_id)
        assert job is not None  # committed just above
        return job

    def check_writable(self) -> None:
        """A real committed write (a disk that is full or read-only raises sqlite3.Error)."""
        self._execute("INSERT OR REPLACE INTO health (id, checked_at) VALUES (1, ?)", (time.time(),))

    def add_event(self, job_id: str, event: dict[str, Any]) -> None:
        data = {k: v for k, v in event.items() if k not in ("type", "time")}
        self._execute(
            "INSERT INTO events (job_id, time, type, data) VALUES (?, ?, ?, ?)",
            (job_id, event.get("time", time.time()), event["type"], json.dumps(data)),
        )

    def update_progress(self, job_id: str, values: dict[str, Any]) -> None:
        values = {k: v for k, v in values.items() if k in PROGRESS_KEYS}
        if values:
            self._execute(
                "UPDATE jobs SET progress = json_patch(progress, ?) WHERE job_id = ?", (json.dumps(values), job_id)
            )

    def add_checkpoint(self, job_id: str, event: dict[str, Any]) -> None:
        entry = {k: event.get(k) for k in ("iteration", "val_loss", "file")}
        self._execute(
            "UPDATE jobs SET checkpoints = json_insert(checkpoints, '$[#]', json(?)) WHERE job_id = ?",
            (json.dumps(entry), job_id),
        )

    def claim_next(self) -> tuple[str, JobSpec] | None:
        """Mark the oldest queued job running and return it."""
        with self._lock:
            row = self._db.execute(
                "SELECT job_id, spec FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            self._db.execute(
                "UPDATE jobs SET status = 'running', started_at = ? WHERE job_id = ? AND status = 'queued'",
                (time.time(), row[0]),
            )
        self.add_event(row[0], {"type": "running"})
        return row[0], decode_spec(row[1])

    def finish(self, job_id: str, status: str, message: str | None = None, error: str | None = None) -> None:
        self._execute(
            "UPDATE jobs SET status = ?, finished_at = ?, message = ?, error = ? WHERE job_id = ?",
            (status, time.time(), message, error, job_id),
        )
        self.add_event(job_id, {"type": status, "message": message, "error": error})

    def request_cancel(self, job_id: str, pause: bool = False) -> str | None:
        """Cancel (or pause) a queued job at once; flag a running one. Returns the status it had.

        A paused job is a cancelled one that means to come back: `cancelled` and `paused` end a
        run alike (its checkpoints kept), and either can be resumed."""
        status = "paused" if pause else "cancelled"
        with self._lock:
            row = self._db.execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row[0] == "queued":
                self._db.execute(
                    "UPDATE jobs SET status = ?, finished_at = ?, message = ? WHERE job_id = ?",
                    (status, time.time(), f"{status} before it started", job_id),
                )
            elif row[0] == "running":
                self._db.execute("UPDATE jobs SET cancel_requested = ? WHERE job_id = ?", (2 if pause else 1, job_id))
        if row[0] == "queued":
            self.add_event(job_id, {"type": status})
        return row[0]

    def cancel_requested(self, job_id: str) -> str | None:
        """`cancelled` or `paused` where a running job was asked to stop so, else None."""
        rows = self._read("SELECT cancel_requested FROM jobs WHERE job_id = ?", (job_id,))
        return {1: "cancelled", 2: "paused"}.get(rows[0][0]) if rows else None

    def requeue(self, job_id: str, reason: str, interrupted: bool = False) -> None:
        """Back to the queue; a fine-tune then resumes from its last checkpoint."""
        self._execute(
            "UPDATE jobs SET status = 'queued', started_at = NULL, finished_at = NULL, error = NULL,"
            " message = ?, cancel_requested = 0, interruptions = interruptions + ? WHERE job_id = ?",
            (reason, int(interrupted), job_id),
        )
        self.add_event(job_id, {"type": "requeued", "message": reason})

    def recover(self) -> list[str]:
        """After a crash: jobs left running go back to the queue, to resume where they were,
        unless they were interrupted so often that they may be what brings the server down."""
        rows = self._execute("SELECT job_id, interruptions FROM jobs WHERE status = 'running'").fetchall()
        for job_id, interruptions in rows:
            if interruptions + 1 >= MAX_INTERRUPTIONS:
                self.finish(job_id, "failed", error=f"interrupted {interruptions + 1} times by the server stopping")
            else:
                self.requeue(
                    job_id,
                    "the server stopped while this job ran; it resumes from its last checkpoint",
                    interrupted=True,
                )
        return [r[0] for r in rows]

    # -- reading -------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def page(
        self, limit: int = 20, before: int | None = None, status: str | None = None, kind: str | None = None
    ) -> JobList:
        """Newest first, `limit` at most, before the job of sequence number `before`."""
        where: list[str] = []
        args: list[int | str] = []
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        if status:
            where.append("status = ?")
            args.append(status)
        if kind:
            where.append("kind = ?")
            args.append(kind)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        latest = self.latest_event()  # first: an event after it is one the list may not show yet
        rows = self._read(f"SELECT seq, {_COLUMNS} FROM jobs {clause} ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        return JobList(jobs=[_job(r[1:]) for r in rows], next_before=rows[-1][0] if more else None, latest_event=latest)

    def seq(self, job_id: str) -> int | None:
        """The job's place in the order of submission (what `page(before=...)` takes)."""
        rows = self._read("SELECT seq FROM jobs WHERE job_id = ?", (job_id,))
        return rows[0][0] if rows else None

    def maker(self, model_id: str) -> str | None:
        """The latest job that makes (or made) `model_id`."""
        rows = self._read("SELECT job_id FROM jobs WHERE model_id = ? ORDER BY seq DESC LIMIT 1", (model_id,))
        return rows[0][0] if rows else None

    def pending_for_model(self, model_id: str) -> list[Job]:
        rows = self._read(
            f"SELECT {_COLUMNS} FROM jobs WHERE model_id = ? AND status IN ('queued', 'running')", (model_id,)
        )
        return [_job(r) for r in rows]

    def pending_outputs(self) -> list[Job]:
        """Jobs that are making a new model or adapter."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM jobs WHERE status IN ('queued', 'running')"
            " AND kind IN ('finetune', 'fuse', 'quantize')"
        )
        return [_job(r) for r in rows]

    def pending_users(self, model_id: str) -> list[str]:
        """Queued or running jobs that read `model_id` (as base or adapter) or write it."""
        rows = self._read(
            "SELECT job_id FROM jobs WHERE status IN ('queued', 'running')"
            " AND (base_model = ? OR model_id = ? OR json_extract(spec, '$.adapter') = ?)",
            (model_id, model_id, model_id),
        )
        return [r[0] for r in rows]

    def spec(self, job_id: str) -> JobSpec | None:
        rows = self._read("SELECT spec FROM jobs WHERE job_id = ?", (job_id,))
        return decode_spec(rows[0][0]) if rows else None

    def count(self, status: str) -> int:
        return self._read("SELECT count(*) FROM jobs WHERE status = ?", (status,))[0][0]

    def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        rows = self._read(
            "SELECT seq, time, type, data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after)
        )
        return [_event(*row) for row in rows]

    def all_events(self, after: int, limit: int = 500) -> list[dict[str, Any]]:
        """Every job's events after event `after`, oldest first, each with its `job_id`."""
        rows = self._read(
            "SELECT seq, time, type, data, job_id FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        )
        return [{**_event(*row[:4]), "job_id": row[4]} for row in rows]

    def latest_event(self) -> int:
        return self._read("SELECT coalesce(max(seq), 0) FROM events")[0][0]


def _event(seq: int, time_: float, kind: str, data: str) -> dict[str, Any]:
    return {"seq": seq, "time": time_, "type": kind, **json.loads(data)}


def _job(row) -> Job:
    job_id, kind, status, model_id, base, created, started, finished, progress, checkpoints, message, error = row
    progress = msgspec.convert(json.loads(progress), Progress)
    if started is not None:
        progress.elapsed_seconds = round((finished or time.time()) - started, 3)
        total, done = progress.total_iterations, progress.iteration
        if status == "running" and total and done:
            progress.eta_seconds = round(progress.elapsed_seconds * (total - done) / done, 1)
    return Job(
        job_id=job_id,
        kind=kind,
        status=status,
        model_id=model_id,
        base_model=base,
        created_at=created,
        started_at=started,
        finished_at=finished,
        progress=progress,
        checkpoints=msgspec.convert(json.loads(checkpoints), list[Checkpoint]),
        message=message,
        error=error,
    )
