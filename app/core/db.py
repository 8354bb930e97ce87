"""Database engine, sessions and the declarative base shared by every domain's models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from sqlalchemy import JSON, BigInteger, DateTime, Engine, Integer, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from app.core.config import get_settings


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset, PostgreSQL keeps it)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


# The largest value an INTEGER column holds (ids, versions): bigger numbers in a request are refused up front.
MAX_INTEGER = 2**31 - 1

# Connections kept open per process: one for each thread of the thread pool (anyio's default limit, 40), which runs
# every request's database work; a request holds its connection from its first query to its commit. Beyond
# pool_size a connection is closed on return, so a smaller pool reconnects to PostgreSQL under load. No overflow:
# two API workers stay within PostgreSQL's default 100 connections.
POOL_SIZE = 40

# 64-bit keys on PostgreSQL; SQLite only auto-increments a column declared exactly INTEGER.
BigIntKey = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict: JSON, list: JSON}


def _private_sqlite_file(path: Path) -> None:
    """Create the database file owner-only before SQLite does; its WAL and shared-memory files copy its mode."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    path.chmod(0o600)


def make_engine(url: str, sqlite_busy_timeout: float = 5.0) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            _private_sqlite_file(Path(path))
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": sqlite_busy_timeout})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            # WAL lets the API read while a worker writes; foreign keys are off by default in SQLite; secure_delete
            # overwrites deleted content (a shredded key or ciphertext) with zeros instead of leaving it in free pages.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA secure_delete=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=0)


def erase_freed_pages(session: Session) -> None:
    """SQLite: copy the WAL into the database file and truncate it, so the old pages it holds (a shredded request's
    wrapped key) are gone from disk too. PostgreSQL reclaims dead tuples and recycles WAL itself."""
    if session.get_bind().dialect.name == "sqlite":
        with session.get_bind().connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def lock_for_write(session: Session) -> None:
    """SQLite's stand-in for row locks: a no-op write takes its single writer lock now, for the whole transaction,
    so a concurrent transaction that would lock the same rows waits for this one instead of reading stale rows.
    PostgreSQL needs nothing: its callers lock the rows themselves (FOR UPDATE)."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("UPDATE base_models SET id = id WHERE 0"))


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    return make_engine(settings.database_url, settings.sqlite_busy_timeout_seconds)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session for code outside a request (worker, CLI): commit is explicit, rollback on error."""
    session = get_sessionmaker()()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
