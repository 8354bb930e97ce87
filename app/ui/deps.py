"""The dashboard's dependencies: the signed-in session (with the same scope and rate-limit checks as an API key),
and the CSRF-checked body of a state-changing form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import Depends, Query, Request, Security
from fastapi.security import SecurityScopes

from app.api.deps import SessionDep, SettingsDep
from app.auth.rate_limit import check_rate
from app.auth.service import require_scope
from app.core.errors import DomainError, Forbidden
from app.ui.models import DashboardSession
from app.ui.sessions import COOKIE, find, same_token

FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_FIELDS = 20
# A list page's free-text filter: blank filters nothing, and a client's value is bounded like every other.
TextFilter = Annotated[str | None, Query(max_length=200)]


class SignInRequired(Exception):
    """No live session: a page redirects to the sign-in form."""


class UnsupportedForm(DomainError):
    status_code = 415
    code = "unsupported_media_type"


def viewer(
    security_scopes: SecurityScopes, request: Request, session: SessionDep, settings: SettingsDep
) -> DashboardSession:
    """The signed-in session: its key within its rate limit (429) and holding the page's scope (403)."""
    token = request.cookies.get(COOKIE)
    row = find(session, token, settings) if token else None
    if row is None:
        raise SignInRequired()
    check_rate(row.api_key, settings)
    for scope in security_scopes.scopes:
        require_scope(row.api_key, scope)
    return row


Reader = Annotated[DashboardSession, Security(viewer, scopes=["requests:read"])]
Admin = Annotated[DashboardSession, Security(viewer, scopes=["admin"])]


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of a urlencoded form (the only kind the dashboard sends); the body's size is already bounded."""
    if request.headers.get("content-type", "").split(";", 1)[0].strip().lower() != FORM_TYPE:
        raise UnsupportedForm("dashboard forms are sent as " + FORM_TYPE)
    try:
        pairs = parse_qsl((await request.body()).decode(), max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise UnsupportedForm("the form is not valid UTF-8 url-encoded data") from None
    return dict(pairs)


@dataclass(frozen=True)
class PostedForm:
    viewer: DashboardSession
    fields: dict[str, str]


def _checked(row: DashboardSession, fields: dict[str, str]) -> PostedForm:
    if not same_token(row.csrf_token, fields.get("csrf_token")):
        raise Forbidden("the form's CSRF token is missing or wrong; reload the page and try again")
    return PostedForm(row, fields)


Fields = Annotated[dict[str, str], Depends(form_fields)]


def reader_form(row: Reader, fields: Fields) -> PostedForm:
    """A signed-in user's form, refused (403) unless it carries the session's CSRF token."""
    return _checked(row, fields)


def admin_form(row: Admin, fields: Fields) -> PostedForm:
    """An admin's form, refused (403) unless it carries the session's CSRF token."""
    return _checked(row, fields)


ReaderPost = Annotated[PostedForm, Depends(reader_form)]
AdminPost = Annotated[PostedForm, Depends(admin_form)]
