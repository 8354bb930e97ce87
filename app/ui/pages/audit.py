"""The audit log (admin): every recorded state change, filtered and paginated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse

from app.api.deps import SessionDep
from app.audit.service import list_events
from app.ui.deps import Admin, TextFilter
from app.ui.templating import page

router = APIRouter()

PAGE_SIZE = 50


@dataclass
class AuditFilters:
    """Blank fields filter nothing; `before` is the cursor (an event id)."""

    actor: TextFilter = None
    action: TextFilter = None
    entity_type: TextFilter = None
    entity_id: TextFilter = None
    before: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None


@router.get("/audit")
def audit_page(request: Request, viewer: Admin, session: SessionDep,
               query: Annotated[AuditFilters, Depends()]) -> HTMLResponse:  # fmt: skip
    filters = {name: getattr(query, name) or "" for name in ("actor", "action", "entity_type", "entity_id")}
    events, next_before = list_events(session, PAGE_SIZE, query.before, **{k: v or None for k, v in filters.items()})
    return page(request, "audit.html", viewer, events=events, next_before=next_before, filters=filters)
