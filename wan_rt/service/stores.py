"""Open a job store by URL: SQLite (a file path) or PostgreSQL (postgresql://...)."""

from __future__ import annotations

from wan_rt.service.jobs import JobStore


def open_store(url: str) -> JobStore:
    """"postgresql://..." -> PostgreSQL; anything else is the path of a SQLite file."""
    if url.startswith(("postgresql://", "postgres://")):
        from wan_rt.service.store_postgres import PostgresJobStore

        return PostgresJobStore(url)
    from wan_rt.service.store_sqlite import SqliteJobStore

    return SqliteJobStore(url)
