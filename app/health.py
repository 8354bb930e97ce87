"""Readiness: whether the database and the broker answer, for /readyz and the dashboard."""

from __future__ import annotations

from sqlalchemy import text

from app.core.db import get_engine
from worker.celery_app import broker_reachable


def readiness_checks() -> dict[str, str]:
    """ "ok" or why not, per dependency."""
    checks = {}
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure to reach it means not ready
        checks["database"] = f"unavailable: {type(exc).__name__}"
    checks["broker"] = "ok" if broker_reachable() else "unavailable"
    return checks
