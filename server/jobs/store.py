"""SQLite persistence of job records, expired job ids and training-model records.

The event loop never writes to disk: save(), mark_expired() and save_model() only put a snapshot
into a pending map, and one writer thread commits the pending snapshots in batches. A snapshot
replaces an older pending one of the same record, which loses nothing because the newer one
contains every field. Reads (load, is_expired) look at the pending and in-flight snapshots before
the database, so a record saved a moment ago is readable at once.

Durability: WAL mode with synchronous=NORMAL, so a committed batch survives a killed process,
and a power loss can roll back the last batches.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .record import Job, Progress
from .states import TERMINAL_STATES, JobState, RESTART_MESSAGE

logger = logging.getLogger(__name__)

EXPIRED_ID_KEEP_S = 7 * 24 * 3600.0  # how long an expired id is reported as expired, then as not found
RETRY_DELAY_S = 1.0  # pause before a failed batch is written again
CLOSE_RETRIES = 3  # failed attempts tolerated while draining on close
SQLITE_MIN_INTEGER, SQLITE_MAX_INTEGER = -2**63, 2**63 - 1  # SQLite stores integers as signed 64-bit

_TERMINAL = tuple(state.value for state in TERMINAL_STATES)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model_id TEXT,
    session_id TEXT,
    seq_id INTEGER,
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    progress TEXT NOT NULL,
    metrics TEXT NOT NULL,
    error TEXT,
    result TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    updated_at REAL,
    finished_at REAL,
    expires_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_by_finished_at ON jobs (finished_at);
CREATE TABLE IF NOT EXISTS expired_jobs (
    id TEXT PRIMARY KEY,
    expired_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS expired_jobs_by_time ON expired_jobs (expired_at);
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""

_JOB_COLUMNS = ("id", "kind", "model_id", "session_id", "seq_id", "state", "phase", "progress", "metrics", "error",
                "result", "created_at", "started_at", "updated_at", "finished_at", "expires_at", "cancel_requested")

# A late non-terminal snapshot never overwrites a terminal row, because terminal states never change.
_UPSERT_JOB = f"""
INSERT INTO jobs ({", ".join(_JOB_COLUMNS)}) VALUES ({", ".join("?" for _ in _JOB_COLUMNS)})
ON CONFLICT (id) DO UPDATE SET {", ".join(f"{name} = excluded.{name}" for name in _JOB_COLUMNS[1:])}
WHERE jobs.state NOT IN ({", ".join(repr(value) for value in _TERMINAL)})
   OR excluded.state IN ({", ".join(repr(value) for value in _TERMINAL)})
"""

_UPSERT_MODEL = ("INSERT INTO models (model_id, record, updated_at) VALUES (?, ?, ?) "
                 "ON CONFLICT (model_id) DO UPDATE SET record = excluded.record, updated_at = excluded.updated_at")


@dataclass(frozen=True)
class _JobSnapshot:
    """A job's fields at save time; the result object is serialized later, in the writer thread."""

    columns: tuple[Any, ...]  # every column of _JOB_COLUMNS except `result`, which is None here
    result: Any
    has_result: bool

    @property
    def job_id(self) -> str:
        return self.columns[0]

    def row(self) -> tuple[Any, ...]:
        result_json = _result_json(self.job_id, self.result) if self.has_result else None
        index = _JOB_COLUMNS.index("result")
        return self.columns[:index] + (result_json,) + self.columns[index + 1:]


@dataclass
class _Batch:
    jobs: dict[str, _JobSnapshot]
    expired: dict[str, float]  # job id -> expired_at
    models: dict[str, dict[str, Any]]

    def __bool__(self) -> bool:
        return bool(self.jobs or self.expired or self.models)


def _empty_batch() -> _Batch:
    return _Batch({}, {}, {})


class SqliteJobStore:
    """The JobStore of the job engine, and the table of training-model records."""

    def __init__(self, path: Path, *, retention_s: float) -> None:
        self.path = Path(path)
        self.retention_s = retention_s
        self.sweep_every_s = min(5.0, retention_s / 4)
        self._changed = threading.Condition()
        self._pending = _empty_batch()
        self._in_flight = _empty_batch()  # taken by the writer, not yet committed
        self._closing = False
        self._writer: threading.Thread | None = None
        self._write_db: sqlite3.Connection | None = None
        self._read_db: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()

    # ---- lifecycle -------------------------------------------------------------------------

    def open(self) -> int:
        """Create the schema, end the jobs a previous process left unfinished, start the writer.

        It blocks, so call it before serving, off the event loop. Returns the number of recovered jobs.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_db = _connect(self.path)
        self._write_db.executescript(SCHEMA)
        recovered = self._fail_unfinished(time.time())
        self._sweep(time.time())
        self._read_db = _connect(self.path)
        self._writer = threading.Thread(target=self._write_forever, name="trainpulse-store-writer", daemon=True)
        self._writer.start()
        return recovered

    def close(self) -> None:
        """Write every pending snapshot, then close the database. Blocking."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        if self._writer is not None:
            self._writer.join()
        if self._write_db is not None:
            self._write_db.close()
        # Requests still in flight during shutdown then read nothing instead of a closed connection.
        with self._read_lock:
            if self._read_db is not None:
                self._read_db.close()
                self._read_db = None

    # ---- JobStore protocol (called on the event loop) --------------------------------------

    def save(self, job: Job) -> None:
        snapshot = _snapshot(job)
        with self._changed:
            if self._closing:
                logger.warning("job %s: state %s not stored, the store is closed", job.id, job.state.value)
                return
            self._pending.jobs[job.id] = snapshot
            self._changed.notify()

    def load(self, job_id: str) -> Job | None:
        with self._changed:
            if job_id in self._pending.expired or job_id in self._in_flight.expired:
                return None
            snapshot = self._pending.jobs.get(job_id) or self._in_flight.jobs.get(job_id)
        if snapshot is not None:
            return _job_from_row(dict(zip(_JOB_COLUMNS, snapshot.columns)), result=snapshot.result)
        # NOTE: JobEngine.fetch() calls this in a worker thread, but JobEngine.cancel() still calls it
        # on the event loop for a job that is no longer in memory (one of an earlier run).
        row = self._read_one(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            return None
        return _job_from_row(dict(zip(_JOB_COLUMNS, row)))

    def is_expired(self, job_id: str) -> bool:
        with self._changed:
            if job_id in self._pending.expired or job_id in self._in_flight.expired:
                return True
        return self._read_one("SELECT 1 FROM expired_jobs WHERE id = ?", (job_id,)) is not None

    def mark_expired(self, job_ids: Iterable[str]) -> None:
        now = time.time()
        with self._changed:
            for job_id in job_ids:
                self._pending.jobs.pop(job_id, None)
                self._pending.expired[job_id] = now
            self._changed.notify()

    # ---- training-model records ------------------------------------------------------------

    def save_model(self, record: dict[str, Any]) -> None:
        """Queue a training-model record (JSON-ready, keyed by "model_id"). Safe from any thread."""
        with self._changed:
            if self._closing:
                logger.warning("model %s: record not stored, the store is closed", record["model_id"])
                return
            self._pending.models[record["model_id"]] = record
            self._changed.notify()

    def load_models(self) -> list[dict[str, Any]]:
        """Return every stored training-model record, oldest first. Blocking."""
        with self._read_lock:
            assert self._read_db is not None, "SqliteJobStore.open() was not called"
            rows = self._read_db.execute("SELECT record FROM models ORDER BY rowid").fetchall()
        return [json.loads(record) for (record,) in rows]

    # ---- writer thread ---------------------------------------------------------------------

    def _write_forever(self) -> None:
        last_sweep = time.monotonic()
        failures = 0
        while True:
            with self._changed:
                if not self._pending and not self._closing:
                    self._changed.wait(timeout=self.sweep_every_s)
                batch, self._pending = self._pending, _empty_batch()
                self._in_flight = batch
                closing = self._closing
            try:
                if batch:
                    self._write_batch(batch)
                if time.monotonic() - last_sweep >= self.sweep_every_s:
                    self._sweep(time.time())
                    last_sweep = time.monotonic()
                failures = 0
            except Exception:
                # _write_batch skips records that cannot be written, so what reaches here is a fault
                # of the database itself, such as a lock or a full disk, and the whole batch is retried.
                failures += 1
                self._requeue(batch)
                if closing and failures >= CLOSE_RETRIES:
                    logger.exception("store %s: gave up writing %d job and %d model records on close",
                                     self.path, len(batch.jobs), len(batch.models))
                    return
                logger.exception("store %s: writing %d job records failed; retrying in %.1f s",
                                 self.path, len(batch.jobs), RETRY_DELAY_S)
                time.sleep(RETRY_DELAY_S)
                continue
            finally:
                with self._changed:
                    self._in_flight = _empty_batch()
            if closing and not self._pending:
                return

    def _write_batch(self, batch: _Batch) -> None:
        """Commit a batch in one transaction, or record by record when one of its records fails.

        Raises only for a fault of the database, which the caller retries.
        """
        try:
            self._commit(batch)
        except Exception as exc:
            if _is_database_fault(exc):
                raise
            logger.warning("store %s: a batch of %d job, %d expiry and %d model records failed (%r), "
                           "so each record is written on its own", self.path, len(batch.jobs), len(batch.expired),
                           len(batch.models), exc)
            self._commit_each(batch)

    def _commit(self, batch: _Batch) -> None:
        db = self._write_db
        assert db is not None
        with db:
            db.executemany(_UPSERT_JOB, [_job_row(snapshot) for snapshot in batch.jobs.values()])
            # Expiry comes after the upserts, so a snapshot of the same batch cannot bring a row back.
            expired = list(batch.expired.items())
            db.executemany("INSERT OR IGNORE INTO expired_jobs (id, expired_at) VALUES (?, ?)", expired)
            db.executemany("DELETE FROM jobs WHERE id = ?", [(job_id,) for job_id, _ in expired])
            db.executemany(_UPSERT_MODEL,
                           [(model_id, json.dumps(record), time.time()) for model_id, record in batch.models.items()])

    def _commit_each(self, batch: _Batch) -> None:
        """Commit each record in its own transaction, logging and skipping a record that fails."""
        for snapshot in batch.jobs.values():
            self._commit_record("job", snapshot.job_id, functools.partial(_write_job, snapshot=snapshot))
        for job_id, expired_at in batch.expired.items():
            self._commit_record("expiry of job", job_id,
                                functools.partial(_write_expiry, job_id=job_id, expired_at=expired_at))
        for model_id, record in batch.models.items():
            self._commit_record("model", model_id, functools.partial(_write_model, model_id=model_id, record=record))

    def _commit_record(self, kind: str, record_id: str, write: Callable[[sqlite3.Connection], Any]) -> None:
        db = self._write_db
        assert db is not None
        try:
            with db:
                write(db)
        except Exception as exc:
            if _is_database_fault(exc):
                raise
            logger.exception("store %s: %s %s not stored, its record cannot be written", self.path, kind, record_id)

    def _requeue(self, batch: _Batch) -> None:
        """Put a failed batch back, under any snapshot saved since, which is newer."""
        with self._changed:
            self._pending = _Batch({**batch.jobs, **self._pending.jobs}, {**batch.expired, **self._pending.expired},
                                   {**batch.models, **self._pending.models})

    # ---- recovery and retention (writer connection) ----------------------------------------

    def _fail_unfinished(self, now: float) -> int:
        db = self._write_db
        assert db is not None
        error = json.dumps({"message": RESTART_MESSAGE, "category": "server"})
        with db:
            cursor = db.execute("UPDATE jobs SET state = ?, error = ?, finished_at = ?, updated_at = ? "
                                "WHERE state IN (?, ?)",
                                (JobState.FAILED.value, error, now, now, JobState.QUEUED.value,
                                 JobState.RUNNING.value))
        return cursor.rowcount

    def _sweep(self, now: float) -> None:
        """Delete jobs finished more than retention_s ago and record their ids as expired."""
        db = self._write_db
        assert db is not None
        cutoff = now - self.retention_s
        with db:
            db.execute("INSERT OR IGNORE INTO expired_jobs (id, expired_at) "
                       "SELECT id, ? FROM jobs WHERE finished_at < ?", (now, cutoff))
            deleted = db.execute("DELETE FROM jobs WHERE finished_at < ?", (cutoff,)).rowcount
            db.execute("DELETE FROM expired_jobs WHERE expired_at < ?", (now - EXPIRED_ID_KEEP_S,))
        if deleted:
            logger.info("store %s: %d finished jobs passed the %.0f s retention and were deleted",
                        self.path, deleted, self.retention_s)

    def list_jobs(self, *, model_id: str | None = None, session_id: str | None = None,
                  states: set[str] | None = None, kind: str | None = None, limit: int = 1000) -> list[Job]:
        """Read written job records, newest first, without their results (blocking: call from a thread).

        Saves still waiting for the writer are not included; callers merge them from memory.
        """
        clauses, parameters = [], []
        for column, value in (("model_id", model_id), ("session_id", session_id), ("kind", kind)):
            if value is not None:
                clauses.append(f"{column} = ?")
                parameters.append(value)
        if states:
            clauses.append(f"state IN ({', '.join('?' for _ in states)})")
            parameters.extend(sorted(states))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        columns = [name if name != "result" else "NULL AS result" for name in _JOB_COLUMNS]
        sql = f"SELECT {', '.join(columns)} FROM jobs {where} ORDER BY created_at DESC LIMIT ?"
        with self._read_lock:
            if self._read_db is None:
                return []
            rows = self._read_db.execute(sql, (*parameters, limit)).fetchall()
        return [_job_from_row(dict(zip(_JOB_COLUMNS, row))) for row in rows]

    def _read_one(self, sql: str, parameters: tuple[Any, ...]) -> tuple[Any, ...] | None:
        with self._read_lock:
            if self._read_db is None:
                return None
            return self._read_db.execute(sql, parameters).fetchone()


def _is_database_fault(exc: Exception) -> bool:
    """Tell a fault of the database (locked, disk full, I/O error, corrupt file) from a bad record.

    A bad record raises OverflowError, TypeError, ValueError, or sqlite3's IntegrityError or
    ProgrammingError when a value cannot be bound or breaks a constraint.
    """
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def _job_row(snapshot: _JobSnapshot) -> tuple[Any, ...]:
    """Return the row of a job snapshot, with each integer that SQLite cannot store replaced by NULL."""
    row = list(snapshot.row())
    for index, (name, value) in enumerate(zip(_JOB_COLUMNS, row)):
        if isinstance(value, int) and not SQLITE_MIN_INTEGER <= value <= SQLITE_MAX_INTEGER:
            logger.warning("job %s: %s %d is outside SQLite's 64-bit integer range, stored as NULL",
                           snapshot.job_id, name, value)
            row[index] = None
    return tuple(row)


def _write_job(db: sqlite3.Connection, snapshot: _JobSnapshot) -> None:
    db.execute(_UPSERT_JOB, _job_row(snapshot))


def _write_expiry(db: sqlite3.Connection, job_id: str, expired_at: float) -> None:
    db.execute("INSERT OR IGNORE INTO expired_jobs (id, expired_at) VALUES (?, ?)", (job_id, expired_at))
    db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))


def _write_model(db: sqlite3.Connection, model_id: str, record: dict[str, Any]) -> None:
    db.execute(_UPSERT_MODEL, (model_id, json.dumps(record), time.time()))


def _connect(path: Path) -> sqlite3.Connection:
    # Each connection is used by one thread at a time, but not always by the thread that opened it.
    connection = sqlite3.connect(path, check_same_thread=False, timeout=5.0)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def _snapshot(job: Job) -> _JobSnapshot:
    progress = job.progress
    columns = (job.id, job.kind, job.model_id, job.session_id, job.seq_id, job.state.value, job.phase,
               json.dumps({"completed": progress.completed, "total": progress.total, "eta_s": progress.eta_s}),
               json.dumps(job.metrics), None if job.error is None else json.dumps(job.error), None,
               job.created_at, job.started_at, job.updated_at, job.finished_at, job.expires_at,
               int(job.cancel_requested))
    return _JobSnapshot(columns, job.result, has_result=job.state is JobState.SUCCEEDED)


def _result_json(job_id: str, result: Any) -> str | None:
    try:
        return json.dumps(result)
    except (TypeError, ValueError) as exc:
        # retrieve_future then returns a null result for this job after a restart.
        logger.warning("job %s: result not stored, it is not JSON-serializable: %s", job_id, exc)
        return None


def _job_from_row(row: dict[str, Any], *, result: Any = None) -> Job:
    """Build a Job from stored columns; `result` is used when the row contains no result JSON."""
    progress = json.loads(row["progress"])
    if row["result"] is not None:
        result = json.loads(row["result"])
    return Job(id=row["id"], kind=row["kind"], model_id=row["model_id"], session_id=row["session_id"],
               seq_id=row["seq_id"], created_at=row["created_at"], expires_at=row["expires_at"],
               state=JobState(row["state"]), phase=row["phase"],
               progress=Progress(progress["completed"], progress["total"], progress["eta_s"]),
               metrics=json.loads(row["metrics"]), error=None if row["error"] is None else json.loads(row["error"]),
               result=result, started_at=row["started_at"], updated_at=row["updated_at"],
               finished_at=row["finished_at"], cancel_requested=bool(row["cancel_requested"]))
