"""PostgreSQL databases of their own, for a test session, a fault test's deployment or a benchmark run."""

from __future__ import annotations

import psycopg
from sqlalchemy.engine import make_url


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def database_url(admin_url: str, name: str) -> str:
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def create_database(admin_url: str, name: str) -> str:
    """A fresh, empty database `name` on the server of `admin_url`; returns its URL."""
    with psycopg.connect(_dsn(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return database_url(admin_url, name)


def drop_database(admin_url: str, url: str) -> None:
    with psycopg.connect(_dsn(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
