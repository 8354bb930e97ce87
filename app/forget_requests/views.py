from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import ReaderKey, SessionDep, SettingsDep, WriterKey
from app.auth.models import ApiKey
from app.core.config import Settings
from app.core.errors import AUTHENTICATED, JSON_BODY, error_responses
from app.forget_requests import service
from app.forget_requests.schemas import ForgetRequestCreate, ForgetRequestOut, ForgetRequestPage

router = APIRouter(prefix="/forget-requests", tags=["forget requests"], responses=AUTHENTICATED)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": ForgetRequestOut, "description": "Replay of an earlier identical submission."},
        **JSON_BODY,
        **error_responses(404, 409),
    },
)
async def submit_forget_request(
    body: ForgetRequestCreate, key: WriterKey, session: SessionDep, settings: SettingsDep, response: Response
) -> ForgetRequestOut:
    """Record a deletion request. Re-sending the same `subject_request_id` and body returns the original (200)."""
    answer, created = await run_in_threadpool(_submit, session, key, body, settings)
    if not created:
        response.status_code = status.HTTP_200_OK
    return answer


def _submit(
    session: Session, key: ApiKey, body: ForgetRequestCreate, settings: Settings
) -> tuple[ForgetRequestOut, bool]:
    """The database work of a submission, in one hop to the thread pool: one transaction, committed."""
    request, created = service.submit(session, key, body, settings)
    session.commit()
    return service.to_out(request), created


@router.get("/{request_id}", responses=error_responses(404))
async def get_forget_request(request_id: uuid.UUID, key: ReaderKey, session: SessionDep) -> ForgetRequestOut:
    return await run_in_threadpool(lambda: service.to_out(service.get(session, request_id, key)))


@router.get("", responses=error_responses(404))
def list_forget_requests(
    key: ReaderKey,
    session: SessionDep,
    settings: SettingsDep,
    status: str | None = None,
    model: str | None = None,
    cursor: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    limit: Annotated[int, Query(ge=1)] = 50,
    subject_request_id: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
) -> ForgetRequestPage:
    page, next_cursor = service.list_requests(
        session, key, status, model, cursor, min(limit, settings.max_page_size), subject_request_id
    )
    return ForgetRequestPage(items=[service.to_out(r) for r in page], next_cursor=next_cursor)


@router.delete("/{request_id}", status_code=status.HTTP_202_ACCEPTED, responses=error_responses(404, 409))
def cancel_forget_request(request_id: uuid.UUID, key: WriterKey, session: SessionDep) -> ForgetRequestOut:
    """Cancel a request that is still pending; a request already batched into a job answers 409."""
    request = service.cancel(session, service.get(session, request_id, key), key.actor)
    session.commit()
    return service.to_out(request)
