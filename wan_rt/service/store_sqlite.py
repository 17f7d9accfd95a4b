"""The job store in one SQLite file (WAL): the default, for one machine."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Sequence

from wan_rt.service.jobs import JobStore


class SqliteJobStore(JobStore):
    def __init__(self, path: str | Path):
        super().__init__()
        self.url = str(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection per store object, shared by its threads under the lock; autocommit, so
        # every statement is its own transaction. Other processes (the workers) open their own.
        self._conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
        # WAL: readers (the API) never wait for the writers (workers' progress) and a commit
        # survives kill -9 of any process. synchronous=NORMAL keeps that (only an OS crash or
        # power loss can lose the last commits) without an fsync per progress update.
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._create_schema()

    def _run(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[tuple], int]:
        with self._lock:
            cursor = self._conn.execute(sql, tuple(params))
            return cursor.fetchall(), cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()
