"""Sign in with an API key (exchanged for a session cookie) and sign out."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.api.deps import SessionDep, SettingsDep
from app.core.errors import Forbidden, Unauthorized
from app.ui import sessions
from app.ui.deps import Fields, ReaderPost
from app.ui.templating import page

router = APIRouter()

# Double-submit token of the sign-in form, which no session protects yet (against login CSRF).
SIGN_IN_COOKIE = "unlearnd_sign_in"
MAX_KEY_CHARS = 200


def _cookie_path(request: Request) -> str:
    return request.scope.get("root_path", "") or "/"


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=_cookie_path(request),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def _safe_next(request: Request, target: str | None) -> str:
    """Only a path of the dashboard itself: never an open redirect to another site."""
    home = f"{request.scope.get('root_path', '')}/"
    if target and target.startswith(home) and not target.startswith("//") and "\\" not in target:
        return target
    return home


def _sign_in_page(request: Request, status: int = 200, error: str | None = None, next_path: str = "") -> HTMLResponse:
    token = sessions.new_token()
    response = page(request, "sign_in.html", None, status, form_token=token, error=error, next_path=next_path)
    _set_cookie(request, response, SIGN_IN_COOKIE, token, max_age=3600)
    return response


@router.get("/sign-in")
def sign_in_form(request: Request, next: str | None = None) -> HTMLResponse:
    return _sign_in_page(request, next_path=_safe_next(request, next))


@router.post("/sign-in")
def sign_in(request: Request, fields: Fields, session: SessionDep, settings: SettingsDep) -> Response:
    next_path = _safe_next(request, fields.get("next"))
    if not sessions.same_token(request.cookies.get(SIGN_IN_COOKIE, ""), fields.get("form_token")):
        return _sign_in_page(request, 403, "The sign-in form expired; please try again.", next_path)
    secret = fields.get("api_key", "").strip()
    if not secret or len(secret) > MAX_KEY_CHARS:
        return _sign_in_page(request, 401, "Enter an API key.", next_path)
    try:
        _, token = sessions.sign_in(session, secret, settings)
    except Unauthorized:
        return _sign_in_page(request, 401, "That key is invalid, expired or revoked.", next_path)
    except Forbidden:
        return _sign_in_page(request, 403, "That key cannot read: the dashboard needs requests:read.", next_path)
    session.commit()
    response = RedirectResponse(next_path, status_code=303)
    _set_cookie(request, response, sessions.COOKIE, token, max_age=int(settings.dashboard_session_hours * 3600))
    response.delete_cookie(SIGN_IN_COOKIE, path=_cookie_path(request))
    return response


@router.post("/sign-out")
def sign_out(request: Request, form: ReaderPost, session: SessionDep) -> Response:
    sessions.sign_out(session, form.viewer)
    session.commit()
    response = RedirectResponse(f"{request.scope.get('root_path', '')}/sign-in", status_code=303)
    response.delete_cookie(sessions.COOKIE, path=_cookie_path(request))
    return response
