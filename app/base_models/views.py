from __future__ import annotations

from fastapi import APIRouter, status

from app.api.deps import AdminKey, ReaderKey, SessionDep
from app.base_models import service
from app.base_models.schemas import BaseModelCreate, BaseModelOut, BaseModelUpdate
from app.core.errors import AUTHENTICATED, JSON_BODY, error_responses

router = APIRouter(prefix="/models", tags=["models"], responses=AUTHENTICATED)


@router.get("")
def list_models(key: ReaderKey, session: SessionDep) -> list[BaseModelOut]:
    return [service.to_out(m, key) for m in service.list_models(session)]


@router.post("", status_code=status.HTTP_201_CREATED, responses={**JSON_BODY, **error_responses(409)})
def register_model(body: BaseModelCreate, key: AdminKey, session: SessionDep) -> BaseModelOut:
    """Register a Hugging Face causal LM from a local directory, with its retain and holdout corpora."""
    model = service.register(session, body, key.actor)
    session.commit()
    return service.to_out(model, key)


@router.patch("/{name}", responses={**JSON_BODY, **error_responses(404)})
def update_model(name: str, body: BaseModelUpdate, key: AdminKey, session: SessionDep) -> BaseModelOut:
    """Change a model's batching policy overrides, e.g. `{"batching": {"schedule": "0 2 * * *"}}` for nightly jobs."""
    model = service.update_batching(session, service.get_by_name(session, name), body, key.actor)
    session.commit()
    return service.to_out(model, key)
