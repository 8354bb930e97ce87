"""The audit log (admin): every recorded state change, filtered and paginated."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from app.audit.service import list_events
from app.core.deps import SessionDep
from app.ui.deps import Admin
from app.ui.templating import page

router = APIRouter()

PAGE_SIZE = 50
Filter = Annotated[str | None, Query(max_length=200)]


@router.get("/audit")
def audit_page(request: Request, viewer: Admin, session: SessionDep, actor: Filter = None, action: Filter = None,
               entity_type: Filter = None, entity_id: Filter = None,
               before: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None) -> HTMLResponse:  # fmt: skip
    filters = {
        "actor": actor or "",
        "action": action or "",
        "entity_type": entity_type or "",
        "entity_id": entity_id or "",
    }
    events, next_before = list_events(session, PAGE_SIZE, before, **{k: v or None for k, v in filters.items()})
    return page(request, "audit.html", viewer, events=events, next_before=next_before, filters=filters)
