"""Typed dependencies shared by every router."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.orm import Session

from app.auth.models import ApiKey
from app.auth.rate_limit import check_rate
from app.auth.service import authenticate, require_scope
from app.core.config import Settings, get_settings
from app.core.db import get_sessionmaker


def get_db() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

# auto_error=False: a missing key is answered by authenticate(), in the one error shape.
bearer = HTTPBearer(auto_error=False, description="An API key from `unlearnd keys create`.")


def current_key(
    security_scopes: SecurityScopes,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    """The caller's key: authenticated (401), within its rate limit (429), holding the route's scope (403).
    The scope is declared with Security(..., scopes=[...]), so the OpenAPI document lists it for every route."""
    key = authenticate(session, credentials.credentials if credentials else None)
    check_rate(key, settings)
    for scope in security_scopes.scopes:
        require_scope(key, scope)
    return key


WriterKey = Annotated[ApiKey, Security(current_key, scopes=["requests:write"])]
ReaderKey = Annotated[ApiKey, Security(current_key, scopes=["requests:read"])]
AdminKey = Annotated[ApiKey, Security(current_key, scopes=["admin"])]
