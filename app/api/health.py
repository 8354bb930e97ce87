"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.errors import DB_RETRY_AFTER_SECONDS, json_error
from app.core.broker import broker_reachable
from app.core.db import get_engine
from app.core.errors import error_responses

health = APIRouter(tags=["health"])


def readiness_checks() -> dict[str, str]:
    """ "ok" or why not, per dependency (for /readyz and the dashboard)."""
    checks = {}
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure to reach it means not ready
        checks["database"] = f"unavailable: {type(exc).__name__}"
    checks["broker"] = "ok" if broker_reachable() else "unavailable"
    return checks


@health.get("/healthz")
def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


@health.get("/readyz", responses={503: {**error_responses(503)[503], "description": "A dependency is unreachable."}})
def readyz() -> JSONResponse:
    """The database and the broker both answer."""
    checks = readiness_checks()
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    return json_error(503, "not_ready", "a dependency is unavailable", checks, {"Retry-After": DB_RETRY_AFTER_SECONDS})
