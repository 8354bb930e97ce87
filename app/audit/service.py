from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from app.audit.models import AuditEvent


def record(session: Session, actor: str, action: str, entity_type: str, entity_id: object, **data: Any) -> None:
    """Add an audit event to the caller's transaction: it commits or rolls back with the change it describes."""
    session.add(AuditEvent(actor=actor, action=action, entity_type=entity_type, entity_id=str(entity_id), data=data))


def list_events(
    session: Session,
    limit: int,
    before: int | None = None,
    actor: str | None = None,
    action: str | None = None,
    entity_type: str | None = None,
    entity_id: str | None = None,
) -> tuple[list[AuditEvent], int | None]:
    """Newest first, keyset-paginated on id: the page and the cursor (an id) of the next one, if any. `action`
    matches a prefix ("job." for every job event)."""
    query = select(AuditEvent)
    if before is not None:
        query = query.where(AuditEvent.id < before)
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if action:
        query = query.where(AuditEvent.action.startswith(action, autoescape=True))
    if entity_type:
        query = query.where(AuditEvent.entity_type == entity_type)
    if entity_id:
        query = query.where(AuditEvent.entity_id == entity_id)
    rows = list(session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit + 1)))
    return rows[:limit], rows[limit - 1].id if len(rows) > limit else None


def history(session: Session, entities: Sequence[tuple[str, object]]) -> list[AuditEvent]:
    """Every event of these (entity type, id) pairs, oldest first: e.g. a request's and its jobs'."""
    if not entities:
        return []
    pairs = [(entity_type, str(entity_id)) for entity_type, entity_id in entities]
    query = select(AuditEvent).where(tuple_(AuditEvent.entity_type, AuditEvent.entity_id).in_(pairs))
    return list(session.scalars(query.order_by(AuditEvent.id)))
