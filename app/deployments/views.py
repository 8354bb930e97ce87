from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from app.api.deps import AdminKey, SessionDep, SettingsDep
from app.base_models.service import get_by_name
from app.callbacks import secrets
from app.callbacks.schemas import CallbackSecretOut
from app.core.db import MAX_INTEGER
from app.core.errors import AUTHENTICATED, JSON_BODY, error_responses
from app.deployments import exports, service
from app.deployments.schemas import CompletionModeUpdate, DeploymentsOut, ExportCreate, ExportOut, TargetCreate

router = APIRouter(prefix="/models/{name}", tags=["deployments"], responses=AUTHENTICATED)
secret_router = APIRouter(tags=["deployments"], responses=AUTHENTICATED)


@secret_router.post("/deployment-secret", status_code=201)
def rotate_deployment_secret(key: AdminKey, session: SessionDep, settings: SettingsDep) -> CallbackSecretOut:
    """Create the secret that signs every deployment delivery (`v2` in X-Unlearnd-Signature, as callbacks), or
    replace it, and show it once; the previous one keeps signing too until `previous_valid_until`."""
    row, secret = secrets.rotate(session, service.SIGNER, settings, key.actor)
    session.commit()
    return CallbackSecretOut(
        tenant=row.tenant, generation=row.generation, secret=secret, previous_valid_until=row.previous_valid_until
    )


@router.get("/deployments", responses=error_responses(404))
def get_deployments(name: str, key: AdminKey, session: SessionDep, settings: SettingsDep) -> DeploymentsOut:
    """The model's deployment targets, the state of each one's latest delivery, and the recent deliveries (admin:
    targets are infrastructure every tenant shares)."""
    return service.overview(session, get_by_name(session, name), settings)


@router.post(
    "/deployment-targets", status_code=status.HTTP_201_CREATED, responses={**JSON_BODY, **error_responses(404, 409)}
)
def add_deployment_target(
    name: str, body: TargetCreate, key: AdminKey, session: SessionDep, settings: SettingsDep
) -> DeploymentsOut:
    """Add a serving stack that must follow `current` (`vllm` or `webhook`); its URL passes the status callbacks'
    checks (allowlisted host, public address). It is sent the current version at once."""
    model = get_by_name(session, name)
    service.create_target(session, model, body, settings, key.actor)
    session.commit()
    return service.overview(session, model, settings)


@router.delete("/deployment-targets/{target}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404))
def remove_deployment_target(
    name: str, target: str, key: AdminKey, session: SessionDep, settings: SettingsDep
) -> Response:
    service.delete_target(session, get_by_name(session, name), target, settings, key.actor)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/deployments/redeliver", status_code=202, responses=error_responses(404, 409))
def redeliver_current(name: str, key: AdminKey, session: SessionDep, settings: SettingsDep) -> DeploymentsOut:
    """Deliver `current` to every target again (e.g. after a delivery was given up, or a server restarted)."""
    model = get_by_name(session, name)
    service.redeliver(session, model, key.actor)
    session.commit()
    return service.overview(session, model, settings)


@router.put("/completion-mode", responses={**JSON_BODY, **error_responses(404)})
def set_completion_mode(
    name: str, body: CompletionModeUpdate, key: AdminKey, session: SessionDep, settings: SettingsDep
) -> DeploymentsOut:
    """`deployed`: a request completes only once a version covering it is deployed to every target; `published`:
    once it is published; null: the service's UNLEARND_COMPLETION_MODE."""
    model = get_by_name(session, name)
    service.set_completion_mode(session, model, body.completion_mode, settings, key.actor)
    session.commit()
    return service.overview(session, model, settings)


@router.post("/exports", status_code=202, responses={**JSON_BODY, **error_responses(404, 409)})
def export_merged(name: str, body: ExportCreate, key: AdminKey, session: SessionDep) -> ExportOut:
    """Write base + the version's fused delta as a full Hugging Face checkpoint into the artifact store, as a job
    on the `gpu` queue; its manifest links it to the version and holds the gate's metrics recomputed on it."""
    export = exports.create_export(session, get_by_name(session, name), body, key.actor)
    session.commit()
    exports.send(session, export)
    return exports.to_out(export)


@router.get("/exports/{export_id}", responses=error_responses(404))
def get_export(
    name: str, export_id: Annotated[int, Path(ge=1, le=MAX_INTEGER)], key: AdminKey, session: SessionDep
) -> ExportOut:
    return exports.to_out(exports.get_export(session, get_by_name(session, name), export_id))
