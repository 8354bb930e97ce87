from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.audit.models import AuditEvent


def record(session: Session, actor: str, action: str, entity_type: str, entity_id: object, **data: Any) -> None:
    """Add an audit event to the caller's transaction: it commits or rolls back with the change it describes."""
    session.add(AuditEvent(actor=actor, action=action, entity_type=entity_type, entity_id=str(entity_id), data=data))
