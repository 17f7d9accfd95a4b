"""Jobs and the job store: the one place that knows how a job is kept and moves between states.

A job is `queued` -> `in_progress` (claimed by one worker) -> `completed` | `failed`. A cancelled
job is `failed` with error code "cancelled"; a deleted job is gone (its id answers "not found").
Workers crash: a job whose worker died goes back to `queued` (keeping its place in the queue)
until it has been tried `max_attempts` times, then `failed` with the reason.

Both stores (SQLite in the data dir, PostgreSQL for workers on several machines) run the same
SQL, written once here; they differ in the connection, the DDL types and the row lock of a claim.
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional, Sequence

STATUSES = ("queued", "in_progress", "completed", "failed")
TERMINAL = ("completed", "failed")


class JobNotFound(LookupError):
    def __init__(self, job_id: str):
        super().__init__(f"no video with id {job_id!r}")
        self.job_id = job_id


class QueueFull(RuntimeError):
    """max_queue jobs are waiting; the caller should retry in about `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float = 5.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelUnavailable(RuntimeError):
    """The service's workers could not load its model and are not restarted: one line, why."""


class InvalidRequest(ValueError):
    """A request the service refuses, in one line; `param` names the field at fault (or None)."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class VideoRequest:
    """What a caller asks for. None means the model's (or the checkpoint's) default; the service
    fills in size, frames, steps and seed at submit time so a stored job always re-runs the same."""

    prompt: str
    negative_prompt: Optional[str] = None
    height: Optional[int] = None
    width: Optional[int] = None
    num_frames: Optional[int] = None
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    guidance_scale_2: Optional[float] = None
    seed: Optional[int] = None
    shift: Optional[float] = None
    solver: Optional[str] = None


@dataclass(frozen=True)
class JobError:
    code: str      # "cancelled", "worker_crashed", "out_of_memory", "invalid_request", "generation_failed"
    message: str


@dataclass(frozen=True)
class Job:
    id: str
    model: str
    request: VideoRequest
    status: str = "queued"
    progress: int = 0                       # 0-100
    created_at: float = 0.0
    started_at: Optional[float] = None
    completed_at: Optional[float] = None
    expires_at: Optional[float] = None      # when a completed job's files are removed
    expired: bool = False                   # its files have been removed
    has_image: bool = False                 # an input image (first frame) was uploaded
    error: Optional[JobError] = None
    last_error: Optional[str] = None        # why the previous attempt did not finish, if one did not
    attempts: int = 0
    worker_id: Optional[str] = None
    cancel_requested: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds per pipeline stage

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


def new_job_id() -> str:
    return "video_" + secrets.token_hex(12)


# Columns in the order of the DDL; `request` and `timings` are JSON text.
_COLUMNS = ("id", "model", "status", "progress", "request", "has_image", "created_at", "started_at",
            "completed_at", "expires_at", "expired", "error_code", "error_message", "last_error",
            "attempts", "worker_id", "heartbeat_at", "cancel_requested", "timings")

_DDL = """
CREATE TABLE IF NOT EXISTS wan_rt_jobs (
    seq {serial} PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    request TEXT NOT NULL,
    has_image INTEGER NOT NULL DEFAULT 0,
    created_at {float} NOT NULL,
    started_at {float},
    completed_at {float},
    expires_at {float},
    expired INTEGER NOT NULL DEFAULT 0,
    error_code TEXT,
    error_message TEXT,
    last_error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    heartbeat_at {float},
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    timings TEXT
);
CREATE INDEX IF NOT EXISTS wan_rt_jobs_queue ON wan_rt_jobs (status, model, seq)
"""

_SELECT = "SELECT " + ", ".join(_COLUMNS) + " FROM wan_rt_jobs"
_RETURNING = " RETURNING " + ", ".join(_COLUMNS)
# A job that is running and still wanted by nobody but its worker.
_OWNED = "id = ? AND worker_id = ? AND status = 'in_progress'"


class JobStore:
    """The store interface and its SQL. Thread-safe; every method is one short transaction.

    Subclasses provide the connection (`_run(sql, params) -> (rows, rowcount)`, one autocommitted
    statement, under `_lock`), the DDL types and `CLAIM_LOCK` (PostgreSQL: FOR UPDATE SKIP LOCKED,
    so concurrent claims never hand out one job twice; SQLite serializes writers on its own).
    `url` opens the same store from another process (`stores.open_store`).
    """

    SERIAL = "INTEGER"
    FLOAT = "REAL"
    CLAIM_LOCK = ""
    url: str = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- dialect hooks
    def _run(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[tuple], int]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _ddl(self) -> list[str]:
        return [s for s in _DDL.format(serial=self.SERIAL, float=self.FLOAT).split(";") if s.strip()]

    def _create_schema(self) -> None:
        for statement in self._ddl():
            self._run(statement)

    # ---------------------------------------------------------------- reads
    def get(self, job_id: str) -> Optional[Job]:
        rows, _ = self._run(_SELECT + " WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def page(self, after: Optional[str] = None, limit: int = 20, order: str = "desc") -> tuple[list[Job], bool]:
        """A page of jobs in submission order (`order` asc|desc), starting after the job `after`;
        -> (jobs, has_more). An unknown `after` raises JobNotFound."""
        cmp, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, params = "", []
        if after is not None:
            rows, _ = self._run("SELECT seq FROM wan_rt_jobs WHERE id = ?", (after,))
            if not rows:
                raise JobNotFound(after)
            where, params = f" WHERE seq {cmp} ?", [rows[0][0]]
        rows, _ = self._run(_SELECT + where + f" ORDER BY seq {direction} LIMIT ?", (*params, limit + 1))
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def counts(self) -> dict[str, int]:
        """Jobs per status (every status present, 0 when none)."""
        rows, _ = self._run("SELECT status, COUNT(*) FROM wan_rt_jobs GROUP BY status")
        return {status: 0 for status in STATUSES} | {status: int(n) for status, n in rows}

    def expired_now(self, now: float) -> list[Job]:
        rows, _ = self._run(_SELECT + " WHERE status = 'completed' AND expired = 0 AND expires_at <= ?", (now,))
        return [_job(r) for r in rows]

    # ---------------------------------------------------------------- callers
    def add(self, job: Job, max_queued: Optional[int] = None) -> Job:
        """Insert a queued job; QueueFull when `max_queued` jobs of its model already wait.
        (One statement: SQLite serializes it; on PostgreSQL concurrent adds may overshoot by a few.)"""
        values = _row(job)
        cols = ", ".join(_COLUMNS)
        marks = ", ".join("?" for _ in _COLUMNS)
        if max_queued is None:
            self._run(f"INSERT INTO wan_rt_jobs ({cols}) VALUES ({marks})", values)
            return job
        _, added = self._run(
            f"INSERT INTO wan_rt_jobs ({cols}) SELECT {marks} WHERE "
            "(SELECT COUNT(*) FROM wan_rt_jobs WHERE status = 'queued' AND model = ?) < ?",
            (*values, job.model, max_queued))
        if not added:
            raise QueueFull(f"the queue is full ({max_queued} jobs waiting); retry later")
        return job

    def cancel(self, job_id: str, now: float) -> Job:
        """A queued job fails at once with code "cancelled"; a running one is flagged, and its
        worker stops at the next step boundary and fails it the same way."""
        self._run("UPDATE wan_rt_jobs SET status = 'failed', error_code = 'cancelled', "
                  "error_message = 'cancelled by request', completed_at = ? WHERE id = ? AND status = 'queued'",
                  (now, job_id))
        self._run("UPDATE wan_rt_jobs SET cancel_requested = 1 WHERE id = ? AND status = 'in_progress'", (job_id,))
        job = self.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def delete(self, job_id: str) -> Job:
        """Remove the job (a running one's worker notices it is gone and stops)."""
        rows, _ = self._run("DELETE FROM wan_rt_jobs WHERE id = ?" + _RETURNING, (job_id,))
        if not rows:
            raise JobNotFound(job_id)
        return _job(rows[0])

    def fail_queued(self, model: str, error: JobError, now: float) -> int:
        """Every queued job of `model` fails with `error` (no worker will run them); -> how many."""
        _, n = self._run("UPDATE wan_rt_jobs SET status = 'failed', error_code = ?, error_message = ?, "
                         "completed_at = ? WHERE status = 'queued' AND model = ?",
                         (error.code, error.message, now, model))
        return n

    def mark_expired(self, job_id: str) -> None:
        self._run("UPDATE wan_rt_jobs SET expired = 1 WHERE id = ?", (job_id,))

    # ---------------------------------------------------------------- workers
    def claim(self, model: str, worker_id: str, now: float) -> Optional[Job]:
        """The oldest queued job of `model`, now in_progress and owned by `worker_id` (or None)."""
        rows, _ = self._run(
            "UPDATE wan_rt_jobs SET status = 'in_progress', worker_id = ?, attempts = attempts + 1, "
            "started_at = ?, heartbeat_at = ?, progress = 0 WHERE seq = (SELECT seq FROM wan_rt_jobs "
            f"WHERE status = 'queued' AND model = ? ORDER BY seq LIMIT 1 {self.CLAIM_LOCK})" + _RETURNING,
            (worker_id, now, now, model))
        return _job(rows[0]) if rows else None

    def heartbeat(self, job_id: str, worker_id: str, now: float) -> bool:
        """Renew the worker's lease; False when the job was cancelled, deleted or taken away."""
        _, n = self._run(f"UPDATE wan_rt_jobs SET heartbeat_at = ? WHERE {_OWNED} AND cancel_requested = 0",
                         (now, job_id, worker_id))
        return n == 1

    def set_progress(self, job_id: str, worker_id: str, progress: int) -> None:
        self._run(f"UPDATE wan_rt_jobs SET progress = ? WHERE {_OWNED}", (progress, job_id, worker_id))

    def complete(self, job_id: str, worker_id: str, now: float, expires_at: Optional[float],
                 timings: dict[str, float]) -> bool:
        """False when the worker no longer owns the job (cancelled, deleted or re-queued meanwhile)."""
        _, n = self._run(
            "UPDATE wan_rt_jobs SET status = 'completed', progress = 100, completed_at = ?, expires_at = ?, "
            f"timings = ? WHERE {_OWNED} AND cancel_requested = 0",
            (now, expires_at, json.dumps(timings), job_id, worker_id))
        return n == 1

    def fail(self, job_id: str, worker_id: str, error: JobError, now: float) -> bool:
        _, n = self._run(f"UPDATE wan_rt_jobs SET status = 'failed', error_code = ?, error_message = ?, "
                         f"completed_at = ? WHERE {_OWNED}", (error.code, error.message, now, job_id, worker_id))
        return n == 1

    def release(self, reason: str, max_attempts: int, now: float, *, code: str = "worker_crashed",
                worker_id: Optional[str] = None, model: Optional[str] = None,
                stale_before: Optional[float] = None, charge: bool = True) -> list[Job]:
        """Running jobs whose worker is gone (this worker, every worker of `model`, or whose lease
        ran out before `stale_before`) go back to the queue in their old place, or fail with
        `code` and `reason` once they have had `max_attempts`. charge=False (an orderly shutdown)
        does not count the interrupted attempt. A job with a pending cancel fails as cancelled."""
        where, params = ["status = 'in_progress'"], []
        for column, op, value in (("worker_id", "=", worker_id), ("model", "=", model),
                                  ("heartbeat_at", "<", stale_before)):
            if value is not None:
                where.append(f"{column} {op} ?")
                params.append(value)
        rows, _ = self._run(_SELECT + " WHERE " + " AND ".join(where), params)
        released = []
        for job in map(_job, rows):
            attempts = job.attempts if charge else job.attempts - 1
            status, error = "failed", None
            if job.cancel_requested:
                error = JobError("cancelled", "cancelled by request")
            elif charge and attempts >= max_attempts:
                error = JobError(code, f"{reason} (attempt {attempts} of {max_attempts})")
            else:
                status = "queued"
            _, n = self._run(
                "UPDATE wan_rt_jobs SET status = ?, error_code = ?, error_message = ?, completed_at = ?, "
                f"attempts = ?, last_error = ?, worker_id = NULL, progress = 0 WHERE {_OWNED}",
                (status, error and error.code, error and error.message, now if error else None, attempts,
                 reason, job.id, job.worker_id))
            if n:
                released.append(replace(job, status=status, error=error, attempts=attempts, last_error=reason,
                                         worker_id=None, progress=0, completed_at=now if error else None))
        return released


def _row(job: Job) -> tuple:
    d = asdict(job)
    return (job.id, job.model, job.status, job.progress, json.dumps(d["request"]), int(job.has_image),
            job.created_at, job.started_at, job.completed_at, job.expires_at, int(job.expired),
            job.error.code if job.error else None, job.error.message if job.error else None, job.last_error,
            job.attempts, job.worker_id, None, int(job.cancel_requested), json.dumps(job.timings))


def _job(row: Sequence[Any]) -> Job:
    r = dict(zip(_COLUMNS, row))
    error = JobError(r["error_code"], r["error_message"] or "") if r["error_code"] else None
    return Job(id=r["id"], model=r["model"], request=VideoRequest(**json.loads(r["request"])), status=r["status"],
               progress=int(r["progress"]), created_at=float(r["created_at"]), started_at=r["started_at"],
               completed_at=r["completed_at"], expires_at=r["expires_at"], expired=bool(r["expired"]),
               has_image=bool(r["has_image"]), error=error, last_error=r["last_error"], attempts=int(r["attempts"]),
               worker_id=r["worker_id"], cancel_requested=bool(r["cancel_requested"]),
               timings=json.loads(r["timings"]) if r["timings"] else {})
