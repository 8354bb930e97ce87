"""Domain errors and their single mapping to the API's JSON error shape {"error": {code, message, details}}."""

from __future__ import annotations

from typing import Any

from app.core.schemas import ErrorResponse


class DomainError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers


class NotFound(DomainError):
    status_code = 404
    code = "not_found"


class Conflict(DomainError):
    status_code = 409
    code = "conflict"


class InvalidInput(DomainError):
    status_code = 422
    code = "invalid_input"


class Unauthorized(DomainError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message, details, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(DomainError):
    status_code = 403
    code = "forbidden"


class RateLimited(DomainError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int, details: Any = None) -> None:
        super().__init__(message, details, headers={"Retry-After": str(retry_after)})


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


# What each status means on this API; every one is answered with ErrorResponse.
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The body is not valid JSON, not UTF-8, or nested deeper than the limit.",
    401: "Missing, invalid or revoked API key.",
    403: "The API key lacks the scope this operation needs.",
    404: "No such resource.",
    409: "The request conflicts with the resource's current state.",
    413: "The body is larger than the limit.",
    415: "The body is not `application/json`.",
    422: "The request does not match the schema or exceeds a limit.",
    429: "The API key is over its rate limit; retry after `Retry-After` seconds.",
    503: "The database is unavailable; retry after `Retry-After` seconds.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting these statuses with the one error shape."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


# Every route behind an API key, and every route that reads a JSON body.
AUTHENTICATED = error_responses(401, 403, 422, 429, 503)
JSON_BODY = error_responses(400, 413, 415)
