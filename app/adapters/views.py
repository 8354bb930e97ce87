from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import Response, StreamingResponse

from app.adapters import service
from app.adapters.publishing import make_current
from app.adapters.schemas import AdapterVersionDetail, AdapterVersionOut, AliasOut, AliasUpdate
from app.adapters.store import MANIFEST, artifact_store
from app.api.deps import AdminKey, ReaderKey, SessionDep, SettingsDep
from app.base_models.service import get_by_name
from app.core.db import MAX_INTEGER
from app.core.errors import AUTHENTICATED, JSON_BODY, error_responses

router = APIRouter(prefix="/models/{name}/adapters", tags=["adapters"], responses=AUTHENTICATED)
aliases = APIRouter(prefix="/models/{name}/aliases", tags=["adapters"], responses=AUTHENTICATED)

Version = Annotated[int, Path(ge=1, le=MAX_INTEGER)]


@router.get("", responses=error_responses(404))
def list_adapter_versions(name: str, key: ReaderKey, session: SessionDep) -> list[AdapterVersionOut]:
    return [service.to_out(v, key) for v in service.list_versions(session, get_by_name(session, name))]


@router.get("/{version}", responses=error_responses(404))
def get_adapter_version(name: str, version: Version, key: ReaderKey, session: SessionDep) -> AdapterVersionDetail:
    """The version's manifest (every file with size and sha256) and its evaluation metrics; a tenant's key sees only
    its own requests among those it covers, and no server paths or engine settings."""
    version_row = service.get_version(session, get_by_name(session, name), version)
    return service.to_detail(session, version_row, key)


@router.get(
    "/{version}/files/{filename}",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}, "application/json": {}},
            "description": "The file's bytes (a tenant's key gets manifest.json filtered as in the version's details).",
        },
        **error_responses(404),
    },
)
def download_adapter_file(
    name: str, version: Version, filename: str, key: ReaderKey, session: SessionDep, settings: SettingsDep
) -> Response:
    """Stream one file of a published version; `X-Content-SHA256` lets the client verify it."""
    row = service.get_version(session, get_by_name(session, name), version)
    if filename == MANIFEST and not key.is_admin:  # the stored manifest lists every tenant's requests
        return Response(json.dumps(service.manifest_for(session, row, key)), media_type="application/json")
    chunks = artifact_store(settings).open_file(name, version, filename)
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    if filename != MANIFEST:
        headers["X-Content-SHA256"] = row.manifest["files"][filename]["sha256"]
    return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)


@aliases.put("/current", responses={**JSON_BODY, **error_responses(404)})
def move_current_alias(
    name: str, body: AliasUpdate, key: AdminKey, session: SessionDep, settings: SettingsDep
) -> AliasOut:
    """Roll the model's `current` adapter back or forward to an existing version (audited)."""
    model = get_by_name(session, name)
    service.move_current(session, model, body.version, key.actor)
    make_current(session, artifact_store(settings), model, body.version)
    return AliasOut(model=name, alias=service.CURRENT, version=body.version)
