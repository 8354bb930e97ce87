"""Typed dependencies shared by every router.

Each one that touches neither the database nor Redis is a coroutine, so FastAPI resolves it on the event loop
instead of handing it to the thread pool (a hop costs about as much CPU as a small query); the key check does its
I/O in one hop of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth.models import ApiKey
from app.auth.rate_limit import check_rate
from app.auth.service import authenticate, require_scope
from app.core.config import Settings, get_settings
from app.core.db import get_sessionmaker


async def get_db() -> AsyncIterator[Session]:
    """A session per request. Opening one does no I/O; closing one still in a transaction (a request that only
    read, or failed) rolls it back over the network, so that close runs in the thread pool."""
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


async def app_settings() -> Settings:
    """The settings, as a dependency a test can override (app.dependency_overrides[app_settings])."""
    return get_settings()


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(app_settings)]

# auto_error=False: a missing key is answered by authenticate(), in the one error shape.
bearer = HTTPBearer(auto_error=False, description="An API key from `unlearnd keys create`.")


def authorize(session: Session, secret: str | None, scopes: list[str], settings: Settings) -> ApiKey:
    """The caller's key: authenticated (401), within its rate limit (429), holding every scope (403)."""
    key = authenticate(session, secret)
    check_rate(key, settings)
    for scope in scopes:
        require_scope(key, scope)
    return key


async def current_key(
    security_scopes: SecurityScopes,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    """authorize() in the thread pool. The scope is declared with Security(..., scopes=[...]), so the OpenAPI
    document lists it for every route."""
    secret = credentials.credentials if credentials else None
    return await run_in_threadpool(authorize, session, secret, security_scopes.scopes, settings)


WriterKey = Annotated[ApiKey, Security(current_key, scopes=["requests:write"])]
ReaderKey = Annotated[ApiKey, Security(current_key, scopes=["requests:read"])]
AdminKey = Annotated[ApiKey, Security(current_key, scopes=["admin"])]
