"""Per-key token buckets: in Redis when the broker is Redis (shared by every API process), else in this process."""

from __future__ import annotations

import logging
import math
import threading
import time
from functools import lru_cache
from typing import Protocol

import redis

from app.auth.models import ApiKey
from app.core.config import Settings
from app.core.errors import RateLimited

log = logging.getLogger(__name__)

# Refill, take one token if there is one, and return the wait (seconds) for the next token; atomic in Redis.
# Redis' own clock is used so every API process agrees on time.
TAKE_TOKEN = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = math.min(burst, (tonumber(state[1]) or burst) + (now - (tonumber(state[2]) or now)) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


class TokenBucket(Protocol):
    def take(self, bucket: str, rate: float, burst: int) -> float:
        """Take one token; returns 0 when granted, else the seconds until a token is available."""


class RedisTokenBucket:
    def __init__(self, url: str) -> None:
        # Short timeouts: a slow Redis must not hold API requests.
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.script = client.register_script(TAKE_TOKEN)

    def take(self, bucket: str, rate: float, burst: int) -> float:
        return float(self.script(keys=[f"unlearnd:rate:{bucket}"], args=[rate, burst]))


class MemoryTokenBucket:
    """For the embedded default (one API process); with several processes each would have its own buckets."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, bucket: str, rate: float, burst: int) -> float:
        with self.lock:
            now = time.monotonic()
            tokens, at = self.buckets.get(bucket, (float(burst), now))
            tokens = min(burst, tokens + (now - at) * rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / rate
            self.buckets[bucket] = (tokens - 1 if wait == 0 else tokens, now)
            return wait


@lru_cache
def token_bucket(broker_url: str) -> TokenBucket:
    if broker_url.startswith(("redis://", "rediss://")):
        return RedisTokenBucket(broker_url)
    return MemoryTokenBucket()


def check_rate(key: ApiKey, settings: Settings) -> None:
    """Answer 429 with Retry-After when the key has used up its bucket."""
    rate = settings.rate_limit_per_minute / 60
    try:
        wait = token_bucket(settings.broker_url).take(f"key:{key.id}", rate, settings.rate_limit_burst)
    except redis.RedisError as exc:
        # Rate limiting protects the service; it must not take the API down with Redis.
        log.warning("rate limiter unavailable (%s); request let through", type(exc).__name__)
        return
    if wait > 0:
        retry_after = max(1, math.ceil(wait))
        raise RateLimited(
            f"rate limit of {settings.rate_limit_per_minute:g} requests per minute exceeded; retry in {retry_after} s",
            retry_after,
            {"limit_per_minute": settings.rate_limit_per_minute, "burst": settings.rate_limit_burst},
        )
