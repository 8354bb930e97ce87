from __future__ import annotations

import base64
import calendar
import hashlib
import json
import uuid
from datetime import datetime

from sqlalchemy import ColumnElement, and_, literal, select, true, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit.service import record
from app.auth.models import ApiKey
from app.base_models.models import RegisteredModel
from app.base_models.service import found, get_by_name
from app.callbacks.secrets import require_secret
from app.callbacks.targets import check_callback_urls
from app.core.canonical import canonical_json
from app.core.config import Settings
from app.core.db import utcnow
from app.core.errors import Conflict, InvalidInput, NotFound
from app.forget_requests.items import item_digest, reseal_if_epoch_moved, seal_items
from app.forget_requests.models import ForgetRequest, RequestStatus
from app.forget_requests.schemas import ForgetRequestCreate, ForgetRequestOut


def add_calendar_months(moment: datetime, months: int) -> datetime:
    """Same day-of-month `months` later, clamped to the month's last day (31 Jan + 1 month = 28/29 Feb)."""
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def body_digest(data: ForgetRequestCreate) -> str:
    return hashlib.sha256(canonical_json(data.model_dump(mode="json", exclude_none=True))).hexdigest()


def _check_limits(data: ForgetRequestCreate, settings: Settings) -> None:
    if len(data.items) > settings.max_items_per_request:
        raise InvalidInput(
            f"too many items: {len(data.items)} > {settings.max_items_per_request}",
            {"limit": settings.max_items_per_request, "field": "items"},
        )
    for index, item in enumerate(data.items):
        length = sum(len(v) for v in (item.text, item.prompt, item.completion) if v)
        if length > settings.max_chars_per_item:
            raise InvalidInput(
                f"item {index} has {length} characters, more than {settings.max_chars_per_item}",
                {"limit": settings.max_chars_per_item, "field": f"items[{index}]"},
            )


def visible_to(key: ApiKey) -> ColumnElement[bool]:
    """The requests a key may see: its tenant's, or every one with `admin`."""
    return true() if key.is_admin else ForgetRequest.tenant == key.tenant


def _existing(session: Session, key: ApiKey, subject_request_id: str) -> ForgetRequest | None:
    return session.scalar(
        select(ForgetRequest).where(
            ForgetRequest.tenant == key.tenant, ForgetRequest.subject_request_id == subject_request_id
        )
    )


def _original_and_model(
    session: Session, key: ApiKey, data: ForgetRequestCreate
) -> tuple[ForgetRequest | None, RegisteredModel | None]:
    """The tenant's earlier submission under this subject_request_id and the model named, either None when there is
    none: one round trip (both outer-joined to a one-row anchor) instead of two."""
    anchor = select(literal(1).label("one")).subquery("anchor")
    query = (
        select(ForgetRequest, RegisteredModel)
        .select_from(anchor)
        .outerjoin(
            ForgetRequest,
            and_(ForgetRequest.tenant == key.tenant, ForgetRequest.subject_request_id == data.subject_request_id),
        )
        .outerjoin(RegisteredModel, RegisteredModel.name == data.model)
    )
    original, model = session.execute(query).one()
    return original, model


def _replay(original: ForgetRequest, digest: str) -> ForgetRequest:
    if original.body_sha256 != digest:
        raise Conflict(
            "subject_request_id was already used with a different body",
            {"subject_request_id": original.subject_request_id, "request_id": str(original.id)},
        )
    return original


def submit(session: Session, key: ApiKey, data: ForgetRequestCreate, settings: Settings) -> tuple[ForgetRequest, bool]:
    """Store a request; returns (request, created). Replaying the same body within the key's tenant returns the
    original, whichever of the tenant's keys sent it first (so a rotated key replays its predecessor's requests)."""
    _check_limits(data, settings)
    digest = body_digest(data)
    original, model = _original_and_model(session, key, data)
    if original is not None:
        return _replay(original, digest), False
    model = found(session, data.model, model)
    callback_urls = [str(url) for url in data.status_callback_urls or []]
    check_callback_urls(callback_urls, settings)
    if callback_urls:
        require_secret(session, key.tenant, settings)
    now = utcnow()
    items = [item.model_dump(exclude_none=True) for item in data.items]
    request = ForgetRequest(
        id=uuid.uuid4(),
        api_key_id=key.id,
        tenant=key.tenant,
        subject_request_id=data.subject_request_id,
        base_model=model,  # so the answer needs no query for it after the commit
        body_sha256=digest,
        status=RequestStatus.pending,
        received_at=now,
        due_at=add_calendar_months(now, settings.deadline_months),
        status_callback_urls=callback_urls,
        item_sha256s=[item_digest(item, settings) for item in items],
    )
    seal_items(request, items, settings)
    session.add(request)
    record(session, key.actor, "forget_request.received", "forget_request", request.id, model=model.name,
           items=len(request.item_sha256s))  # fmt: skip
    try:
        session.flush()  # one round trip per row: the request and its audit event
    except IntegrityError:
        # A concurrent submission with the same idempotency key won the race.
        session.rollback()
        original = _existing(session, key, data.subject_request_id)
        if original is None:
            raise
        return _replay(original, digest), False
    # Written: a key epoch advance from now on waits for this transaction (app/retention/epochs.py).
    reseal_if_epoch_moved(request, items, settings)
    return request, True


def get(session: Session, request_id: uuid.UUID, key: ApiKey) -> ForgetRequest:
    # Another tenant's request answers exactly like a missing one, so ids are never confirmed.
    request = session.scalar(select(ForgetRequest).where(ForgetRequest.id == request_id, visible_to(key)))
    if request is None:
        raise NotFound(f"no forget request with id {request_id}")
    return request


def encode_cursor(request: ForgetRequest) -> str:
    raw = json.dumps([request.received_at.isoformat(), str(request.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        received, request_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        received = datetime.fromisoformat(received)
        if received.tzinfo is None:  # a forged cursor: every cursor this service writes carries its offset
            raise ValueError("a cursor's time needs its UTC offset")
        return received, uuid.UUID(request_id)
    except (ValueError, TypeError) as exc:
        raise InvalidInput("invalid cursor", {"field": "cursor"}) from exc


def list_requests(
    session: Session,
    key: ApiKey,
    status: str | None,
    model: str | None,
    cursor: str | None,
    limit: int,
    subject_request_id: str | None = None,
) -> tuple[list[ForgetRequest], str | None]:
    """Newest first, keyset-paginated on (received_at, id) so pages stay stable while requests arrive."""
    query = select(ForgetRequest).where(visible_to(key))
    if subject_request_id is not None:
        query = query.where(ForgetRequest.subject_request_id == subject_request_id)
    if status is not None:
        if status not in RequestStatus.__members__:
            raise InvalidInput(f"unknown status '{status}'", {"known": list(RequestStatus.__members__)})
        query = query.where(ForgetRequest.status == status)
    if model is not None:
        query = query.where(ForgetRequest.base_model_id == get_by_name(session, model).id)
    if cursor is not None:
        query = query.where(tuple_(ForgetRequest.received_at, ForgetRequest.id) < decode_cursor(cursor))
    query = query.order_by(ForgetRequest.received_at.desc(), ForgetRequest.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query))
    page, more = rows[:limit], len(rows) > limit
    return page, encode_cursor(page[-1]) if more else None


def cancel(session: Session, request: ForgetRequest, actor: str) -> ForgetRequest:
    if request.status == RequestStatus.cancelled:
        return request
    if request.status != RequestStatus.pending:
        raise Conflict(
            f"request is {request.status}; only pending requests can be cancelled",
            {"status": request.status},
        )
    request.status = RequestStatus.cancelled
    record(session, actor, "forget_request.cancelled", "forget_request", request.id)
    return request


def to_out(request: ForgetRequest) -> ForgetRequestOut:
    return ForgetRequestOut(
        id=request.id,
        subject_request_id=request.subject_request_id,
        model=request.base_model.name,
        status=request.status,
        item_count=len(request.item_sha256s),
        received_at=request.received_at,
        due_at=request.due_at,
        completed_at=request.completed_at,
        failure_reason=request.failure_reason,
        attempts=request.attempts,
        item_metrics=request.item_metrics,
        shredded_at=request.shredded_at,
        status_callback_urls=request.status_callback_urls,
    )
