"""The admin dashboard: a FastAPI application of its own, mounted at /ui by the API process, so it has its own
error pages (HTML in the dashboard's style, where the API answers JSON) and security headers."""

from __future__ import annotations

import logging
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import DomainError
from app.ui.deps import SignInRequired
from app.ui.pages import audit, auth, jobs, models, overview, requests
from app.ui.templating import HERE, page

log = logging.getLogger(__name__)

# Everything from this origin only: no inline script or style, no framing, forms post back here.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
TITLES = {401: "Not signed in", 403: "Not allowed", 404: "Not found", 405: "Not allowed here", 409: "Conflict",
          415: "Unsupported form", 422: "Invalid input", 429: "Slow down", 503: "Unavailable"}  # fmt: skip


def error_page(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> HTMLResponse:
    response = page(request, "error.html", None, status, status=status, title=TITLES.get(status, "Error"),
                    message=message)  # fmt: skip
    response.headers.update(headers or {})
    return response


def add_error_pages(ui: FastAPI) -> None:
    @ui.exception_handler(SignInRequired)
    async def sign_in_required(request: Request, _: SignInRequired) -> Response:
        target = f"{request.scope.get('root_path', '')}/sign-in"
        if request.headers.get("HX-Request"):  # a polled fragment: htmx sends the whole page there
            return Response(status_code=401, headers={"HX-Redirect": target})
        if request.method == "GET":
            target += "?next=" + quote(request.url.path)
        return RedirectResponse(target, status_code=303)

    @ui.exception_handler(DomainError)
    async def domain_error(request: Request, exc: DomainError) -> HTMLResponse:
        return error_page(request, exc.status_code, exc.message, exc.headers)

    @ui.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> HTMLResponse:
        # A malformed id in the address names nothing, exactly like an unknown one; never echo the value.
        if any(error.get("loc", ("",))[0] == "path" for error in exc.errors()):
            return error_page(request, 404, "There is nothing at this address.")
        return error_page(request, 422, "The form or query does not have the expected fields.")

    @ui.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> HTMLResponse:
        messages = {404: "There is nothing at this address.", 405: "This address does not take that method."}
        return error_page(request, exc.status_code, messages.get(exc.status_code, str(exc.detail)))

    @ui.exception_handler(DBAPIError)
    async def database_unavailable(request: Request, exc: DBAPIError) -> HTMLResponse:
        log.error("database error: %s", type(exc.orig).__name__ if exc.orig else type(exc).__name__)
        return error_page(request, 503, "The database is unavailable; retry shortly.", {"Retry-After": "5"})


def create_ui() -> FastAPI:
    ui = FastAPI(title="unlearnd dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    for pages in (auth, overview, jobs, requests, models, audit):
        ui.include_router(pages.router)
    ui.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    add_error_pages(ui)

    @ui.middleware("http")
    async def security_headers(request: Request, call_next) -> Response:
        static = request.url.path.startswith(f"{request.scope.get('root_path', '')}/static/")  # before routing moves it
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if not static:
            response.headers["Cache-Control"] = "no-store"  # pages show private data: never kept in a cache
        return response

    return ui
