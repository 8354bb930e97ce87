"""The API's connection pool against its thread pool, where every request's database work runs."""

from __future__ import annotations

import anyio
from anyio.to_thread import current_default_thread_limiter


async def _threads() -> int:
    return int(current_default_thread_limiter().total_tokens)


def test_the_pool_keeps_a_connection_for_every_thread_of_the_thread_pool():
    """A smaller pool closes the connections it cannot keep on return, so under load the API reconnects to
    PostgreSQL: main opened a new session every 4 POSTs at 32 clients (docs/BENCHMARKS.md, Load)."""
    from app.core.db import make_engine

    engine = make_engine("postgresql+psycopg://unlearnd@127.0.0.1:5432/unlearnd")  # creating one connects nowhere
    assert engine.pool.size() >= anyio.run(_threads)
