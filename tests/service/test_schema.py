"""The ORM models and the Alembic migrations describe the same schema, on PostgreSQL and on SQLite."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext


def schema_differences(engine) -> list:
    from app.models import Base

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_postgres_migrations_match_the_models(database):
    from app.core.db import get_engine

    assert schema_differences(get_engine()) == []


def test_sqlite_migrations_match_the_models(tmp_path):
    from app.core.db import make_engine
    from app.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'schema.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    assert schema_differences(engine) == []
    engine.dispose()
