"""The job store in PostgreSQL (psycopg 3), so workers on several machines share one queue.

Claims lock the row they take with FOR UPDATE SKIP LOCKED: two workers claiming at once get two
different jobs, and neither waits for the other. Outputs are files in the data dir, so services
sharing a queue must share that folder too (a network file system) to serve each other's videos.
"""

from __future__ import annotations

from typing import Any, Sequence

from wan_rt.service.jobs import JobStore


class PostgresJobStore(JobStore):
    SERIAL = "BIGSERIAL"
    FLOAT = "DOUBLE PRECISION"
    CLAIM_LOCK = "FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise ConnectionError("the PostgreSQL job store needs psycopg: pip install 'wan-rt[postgres]'") from None

        super().__init__()
        self.url = url
        try:
            self._conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConnectionError(f"cannot connect to the job store {_redacted(url)}: {first}") from None
        self._create_schema()

    def _create_schema(self) -> None:
        # Two services creating the table at once would race on the catalog; one lock orders them.
        with self._lock, self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(7079847)")
            for statement in self._ddl():
                self._conn.execute(statement)  # type: ignore[arg-type]

    def _run(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[tuple], int]:
        with self._lock:
            cursor = self._conn.execute(sql.replace("?", "%s"), tuple(params))  # type: ignore[arg-type]
            rows = cursor.fetchall() if cursor.description is not None else []
            return rows, cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _redacted(url: str) -> str:
    """The URL without its password, for error messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
