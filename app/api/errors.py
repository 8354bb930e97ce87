"""The one mapping of every error to the API's JSON error shape {"error": {code, message, details}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import DomainError, error_body

log = logging.getLogger(__name__)

DB_RETRY_AFTER_SECONDS = "5"
# Enough to fix a request by; a body of 100 000 bad items must not produce a 100 000-entry answer.
MAX_VALIDATION_ERRORS = 20


def json_error(status: int, code: str, message: str, details=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def _validation_details(exc: RequestValidationError) -> list[dict]:
    # Never echo the submitted values: they may be the very text a person asked to have forgotten.
    errors = exc.errors()[:MAX_VALIDATION_ERRORS]
    return [{"loc": list(e.get("loc", ())), "type": e.get("type"), "msg": e.get("msg")} for e in errors]


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def domain_error(_: Request, exc: DomainError) -> JSONResponse:
        return json_error(exc.status_code, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        if any(d["type"] == "json_invalid" for d in details):
            return json_error(400, "malformed_json", "the request body is not valid JSON", details)
        return json_error(422, "invalid_input", "the request does not match the schema", details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers 400 only for a body json.loads refuses beyond a syntax error (e.g. a 5000-digit number).
        code = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405 and (known := request.app.state.routes.match(request.url.path)) is not None:
            # Every method of the path: Starlette's own answer names only the first matching route's.
            headers = {**(headers or {}), "Allow": ", ".join(sorted(known[1]))}
        return json_error(exc.status_code, code, str(exc.detail), None, headers)

    @app.exception_handler(DataError)
    async def unstorable_value(_: Request, exc: DataError) -> JSONResponse:
        # The database refused a value the request carried (PostgreSQL text cannot hold NUL characters).
        log.info("database refused a request value: %s", type(exc.orig).__name__)
        return json_error(422, "invalid_input", "the request contains a value the database cannot store")

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def database_unavailable(_: Request, exc: DBAPIError) -> JSONResponse:
        log.error("database error: %s", type(exc.orig).__name__ if exc.orig else type(exc).__name__)
        return json_error(
            503,
            "database_unavailable",
            "the database is unavailable; retry shortly",
            None,
            {"Retry-After": DB_RETRY_AFTER_SECONDS},
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return json_error(500, "internal_error", "internal error; it has been logged")
