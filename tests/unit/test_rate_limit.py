"""The in-process token bucket that limits each API key on the embedded default (Redis keeps it otherwise)."""

from __future__ import annotations


def test_the_in_process_bucket_allows_the_burst_then_asks_to_wait():
    from app.auth.rate_limit import MemoryTokenBucket

    bucket = MemoryTokenBucket()
    assert [bucket.take("k", rate=1.0, burst=2) for _ in range(2)] == [0.0, 0.0]
    assert 0 < bucket.take("k", rate=1.0, burst=2) <= 1.0
    assert bucket.take("other", rate=1.0, burst=2) == 0.0
