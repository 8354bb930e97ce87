"""Typed dependencies shared by every router."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth.models import ApiKey
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


# Declared in the OpenAPI spec; a missing or non-Bearer header is answered by `authenticate` with 401.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer unl_...`.")


def _bearer(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]) -> str | None:
    return credentials.credentials if credentials else None


def requires(scope: str) -> Callable[..., ApiKey]:
    def dependency(session: SessionDep, secret: Annotated[str | None, Depends(_bearer)]) -> ApiKey:
        key = authenticate(session, secret)
        require_scope(key, scope)
        return key

    return dependency


WriterKey = Annotated[ApiKey, Depends(requires("requests:write"))]
ReaderKey = Annotated[ApiKey, Depends(requires("requests:read"))]
AdminKey = Annotated[ApiKey, Depends(requires("admin"))]
