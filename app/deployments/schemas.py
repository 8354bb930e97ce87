from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from app.core.db import MAX_INTEGER
from app.core.schemas import Schema
from app.deployments.models import TargetKind

CompletionMode = Literal["published", "deployed"]


class TargetCreate(Schema):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: TargetKind
    url: str = Field(
        min_length=1, max_length=2000, description="vLLM: the server's base URL; webhook: where events are POSTed."
    )
    served_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f]+$",
        description="vLLM: the name the version is loaded under (default: the model's name, shadowing a base "
        "served under that name).",
    )
    lora_root: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        pattern=r"^/[^\x00-\x1f]*$",
        description="vLLM: the artifact store's root as the server sees it (default: the local store's root).",
    )
    api_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="vLLM: the name of a key in UNLEARND_DEPLOYMENT_API_KEYS, sent as a bearer token.",
    )


class DeploymentOut(Schema):
    id: int
    target: str
    version: int
    previous_version: int | None
    event: str
    state: str = Field(description="pending (being retried), delivered, superseded (a later move), or failed.")
    attempts: int
    occurred_at: datetime
    delivered_at: datetime | None
    last_error: str | None


class TargetOut(Schema):
    id: int
    name: str
    kind: str
    url: str
    served_name: str | None
    lora_root: str | None
    api_key: str | None
    created_at: datetime
    latest: DeploymentOut | None = Field(description="The delivery of the latest move of `current` to this target.")


class DeploymentsOut(Schema):
    model: str
    current_version: int | None
    completion_mode: CompletionMode = Field(description="In effect for this model (its own, else the service's).")
    targets: list[TargetOut]
    deployments: list[DeploymentOut] = Field(description="The most recent deliveries, newest first.")


class CompletionModeUpdate(Schema):
    completion_mode: CompletionMode | None = Field(description="null: the service's UNLEARND_COMPLETION_MODE.")


class ExportCreate(Schema):
    version: int | None = Field(default=None, ge=1, le=MAX_INTEGER, description="Default: the `current` version.")
    dtype: Literal["bfloat16", "base"] = Field(default="bfloat16", description="`base`: the base weights' dtype.")


class ExportOut(Schema):
    id: int
    model: str
    version: int
    dtype: str
    status: str
    artifact_uri: str | None
    manifest: dict | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None
