"""Status callbacks: every status change of a request with callback URLs becomes one delivery row per URL, written
in the same transaction, and each row's id goes to the default queue once that transaction has committed.

Status changes are noticed by a before_flush listener on every Session, so the code that changes a status
(submission, batching, the job runner, cancellation, and whatever comes next) needs no call of its own and cannot
forget one. The listeners are registered explicitly by each process that changes statuses (`register_listeners`:
the API's create_app and the worker's tasks module).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import event, inspect, select
from sqlalchemy.orm import Session, UOWTransaction

from app.callbacks.models import CallbackDelivery
from app.core.broker import enqueue_callbacks
from app.core.config import Settings
from app.core.db import utcnow
from app.forget_requests.models import ForgetRequest

log = logging.getLogger(__name__)

# Ids of deliveries flushed in a session's current transaction, to send once it commits.
UNSENT = "unlearnd.unsent_callback_deliveries"
SWEEP_BATCH = 1000


def record_status_changes(session: Session, _context: UOWTransaction, _instances: object) -> None:
    """before_flush: a delivery per callback URL for each new request and each request whose status changed."""
    now = utcnow()
    for request in [*session.new, *session.dirty]:
        if not isinstance(request, ForgetRequest):
            continue
        if request not in session.new and not inspect(request).attrs.status.history.has_changes():
            continue
        for url in request.status_callback_urls or []:
            session.add(
                CallbackDelivery(request=request, url=url, status=request.status, occurred_at=now, next_attempt_at=now)
            )


def remember_deliveries(session: Session, _context: UOWTransaction) -> None:
    ids = [d.id for d in session.new if isinstance(d, CallbackDelivery)]
    if ids:
        session.info.setdefault(UNSENT, []).extend(ids)


def send_after_commit(session: Session) -> None:
    dispatch(session.info.pop(UNSENT, []))


def drop_after_rollback(session: Session) -> None:
    session.info.pop(UNSENT, None)


LISTENERS = (
    ("before_flush", record_status_changes),
    ("after_flush", remember_deliveries),
    ("after_commit", send_after_commit),
    ("after_rollback", drop_after_rollback),
)


def register_listeners() -> None:
    """Make every Session record status changes as callback deliveries and send them after commit (idempotent)."""
    for name, listener in LISTENERS:
        if not event.contains(Session, name, listener):
            event.listen(Session, name, listener)


def dispatch(delivery_ids: list[int]) -> None:
    """Send delivery ids to the default queue; never raises, since the rows are the source of truth."""
    if not delivery_ids:
        return
    try:
        enqueue_callbacks(delivery_ids)
    except Exception:  # broker down: the beat sweep sends them once the broker is back
        log.exception("could not enqueue callback deliveries %s; the sweep will resend them", delivery_ids)


def overdue_deliveries(session: Session, settings: Settings) -> list[int]:
    """Undelivered rows due for longer than one sweep interval: their message was lost (or the broker was down)."""
    cutoff = utcnow() - timedelta(seconds=settings.callback_sweep_interval_seconds)
    query = (
        select(CallbackDelivery.id)
        .where(CallbackDelivery.delivered_at.is_(None), CallbackDelivery.next_attempt_at <= cutoff)
        .order_by(CallbackDelivery.next_attempt_at)
        .limit(SWEEP_BATCH)
    )
    return list(session.scalars(query))
