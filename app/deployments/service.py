"""Deployment targets of a model, the deliveries of each move of its `current` alias, and completion on deployment.

A move of `current` (a publish, a roll back or forward) adds one delivery row per target in the caller's
transaction; the rows' ids go to the default queue once it commits (`register_listeners`), and the scheduler
re-sends those whose message was lost. In the `deployed` completion mode a request whose version was published
stays `running` until the model's `current` version, covering it, has been delivered to every target.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event, select
from sqlalchemy.orm import Session, UOWTransaction

from app.adapters.models import AdapterVersion
from app.audit.service import record
from app.base_models.models import RegisteredModel
from app.callbacks.secrets import signing_secrets
from app.callbacks.service import dispatch as send_ids
from app.callbacks.service import overdue_deliveries
from app.callbacks.targets import check_callback_url
from app.core.broker import enqueue_deployments
from app.core.config import Settings
from app.core.db import utcnow
from app.core.errors import Conflict, InvalidInput, NotFound
from app.deployments.models import Deployment, DeploymentTarget, TargetKind
from app.deployments.schemas import CompletionMode, DeploymentOut, DeploymentsOut, TargetCreate, TargetOut
from app.forget_requests.models import ForgetRequest, RequestStatus
from app.jobs.models import UNMERGE, JobStatus, UnlearningJob, job_key, job_requests

PUBLISHED, MOVED = "adapter.published", "alias.moved"
# The signer of deployment deliveries among the callbacks' per-tenant secrets: never a tenant, whose names start with
# a letter or digit, so no tenant's secret signs a deployment event.
SIGNER = "_deployments"
UNSENT = "unlearnd.unsent_deployments"  # ids flushed in a session's transaction, sent once it commits
RECENT = 50


def completion_mode(model: RegisteredModel, settings: Settings) -> CompletionMode:
    return model.completion_mode or settings.completion_mode


def targets(session: Session, model: RegisteredModel) -> list[DeploymentTarget]:
    query = select(DeploymentTarget).where(DeploymentTarget.base_model_id == model.id).order_by(DeploymentTarget.id)
    return list(session.scalars(query))


def _checked(session: Session, model: RegisteredModel, data: TargetCreate, settings: Settings) -> DeploymentTarget:
    """The target to store, once its URL passes the callbacks' SSRF checks and its fields fit its kind."""
    check_callback_url(data.url, settings, field="url")
    if not signing_secrets(session, SIGNER, settings):
        raise InvalidInput(
            "deployment deliveries are signed: create their secret first (POST /v1/deployment-secret)",
            {"field": "url", "reason": "no_deployment_secret"},
        )
    if data.kind == TargetKind.webhook:
        extra = [name for name in ("served_name", "lora_root", "api_key") if getattr(data, name) is not None]
        if extra:
            raise InvalidInput("a webhook target takes only a name and a url", {"fields": extra})
        return DeploymentTarget(base_model_id=model.id, name=data.name, kind=data.kind, url=data.url)
    if data.api_key is not None and data.api_key not in settings.deployment_api_keys:
        raise InvalidInput(
            "api_key names no key in UNLEARND_DEPLOYMENT_API_KEYS",
            {"field": "api_key", "known": sorted(settings.deployment_api_keys)},
        )
    lora_root = data.lora_root
    if lora_root is None:
        if settings.s3_bucket:
            raise InvalidInput(
                "a vLLM target of an S3 store needs lora_root: where the server sees the files", {"field": "lora_root"}
            )
        lora_root = str(Path(settings.artifact_dir).resolve())
    return DeploymentTarget(
        base_model_id=model.id, name=data.name, kind=data.kind, url=data.url.rstrip("/"),
        served_name=data.served_name, lora_root=lora_root.rstrip("/") or "/", api_key=data.api_key,
    )  # fmt: skip


def create_target(
    session: Session, model: RegisteredModel, data: TargetCreate, settings: Settings, actor: str
) -> DeploymentTarget:
    """Add a target (caller commits); it is sent the `current` version at once, if there is one."""
    if any(t.name == data.name for t in targets(session, model)):
        raise Conflict(f"model '{model.name}' already has a deployment target '{data.name}'")
    target = _checked(session, model, data, settings)
    session.add(target)
    session.flush()
    record(
        session,
        actor,
        "deployment.target_added",
        "base_model",
        model.id,
        target=target.name,
        kind=target.kind,
        url=target.url,
    )
    if model.current_version is not None:
        session.add(_delivery(target, model.current_version, None, MOVED))
    return target


def get_target(session: Session, model: RegisteredModel, name: str) -> DeploymentTarget:
    target = session.scalar(
        select(DeploymentTarget).where(DeploymentTarget.base_model_id == model.id, DeploymentTarget.name == name)
    )
    if target is None:
        raise NotFound(f"model '{model.name}' has no deployment target '{name}'")
    return target


def delete_target(session: Session, model: RegisteredModel, name: str, settings: Settings, actor: str) -> None:
    target = get_target(session, model, name)
    session.delete(target)
    session.flush()
    record(session, actor, "deployment.target_removed", "base_model", model.id, target=name)
    settle(session, model, settings)


def set_completion_mode(
    session: Session, model: RegisteredModel, mode: CompletionMode | None, settings: Settings, actor: str
) -> None:
    previous, model.completion_mode = model.completion_mode, mode
    record(
        session,
        actor,
        "base_model.completion_mode_changed",
        "base_model",
        model.id,
        previous=previous,
        completion_mode=mode,
    )
    settle(session, model, settings)


def _delivery(target: DeploymentTarget, version: int, previous: int | None, kind: str) -> Deployment:
    now = utcnow()
    return Deployment(
        target=target, version=version, previous_version=previous, event=kind, occurred_at=now, next_attempt_at=now
    )


def on_alias_moved(session: Session, model: RegisteredModel, version: int, previous: int | None, kind: str) -> None:
    """`current` moves to `version` in the caller's transaction: one delivery per target, sent once it commits."""
    for target in targets(session, model):
        session.add(_delivery(target, version, previous, kind))


def redeliver(session: Session, model: RegisteredModel, actor: str) -> None:
    if model.current_version is None:
        raise Conflict(f"model '{model.name}' has no `current` version to deliver")
    record(session, actor, "deployment.redelivered", "base_model", model.id, version=model.current_version)
    on_alias_moved(session, model, model.current_version, model.current_version, MOVED)


def completion_status(session: Session, model: RegisteredModel, settings: Settings) -> RequestStatus:
    """What a request becomes when a version covering it is published: completed, or still running until that
    version has been deployed to every target."""
    if completion_mode(model, settings) == "deployed" and targets(session, model):
        return RequestStatus.running
    return RequestStatus.completed


def _deployed_everywhere(session: Session, model: RegisteredModel, version: int) -> bool:
    """Every target's latest delivery (what it serves now, not what it served before a roll back) is `version`'s,
    delivered."""
    latest = [_latest(session, target) for target in targets(session, model)]
    return all(row is not None and row.version == version and row.delivered_at is not None for row in latest)


def _latest(session: Session, target: DeploymentTarget) -> Deployment | None:
    query = select(Deployment).where(Deployment.target_id == target.id).order_by(Deployment.id.desc()).limit(1)
    return session.scalar(query)


def settle(session: Session, model: RegisteredModel, settings: Settings) -> list[ForgetRequest]:
    """Complete the requests waiting for deployment that `current` covers, once it is deployed where it must be."""
    version = model.current_version
    if version is None:
        return []
    if completion_status(session, model, settings) == RequestStatus.running and not _deployed_everywhere(
        session, model, version
    ):
        return []
    row = session.scalar(
        select(AdapterVersion).where(AdapterVersion.base_model_id == model.id, AdapterVersion.version == version)
    )
    covered = set(row.manifest.get("jobs", [])) if row else set()
    waiting = session.execute(
        select(ForgetRequest, UnlearningJob.id)
        .join(job_requests, job_requests.c.request_id == ForgetRequest.id)
        .join(UnlearningJob, UnlearningJob.id == job_requests.c.job_id)
        .where(
            ForgetRequest.base_model_id == model.id,
            ForgetRequest.status == RequestStatus.running,
            UnlearningJob.status == JobStatus.succeeded,
            UnlearningJob.method != UNMERGE,
        )
    ).all()
    now, completed = utcnow(), []
    for request, job_id in waiting:
        if job_key(job_id) in covered:
            request.status, request.completed_at = RequestStatus.completed, now
            completed.append(request)
    return completed


def to_out(row: Deployment) -> DeploymentOut:
    return DeploymentOut(
        id=row.id, target=row.target.name, version=row.version, previous_version=row.previous_version,
        event=row.event, state=row.state, attempts=row.attempts, occurred_at=row.occurred_at,
        delivered_at=row.delivered_at, last_error=row.last_error,
    )  # fmt: skip


def overview(session: Session, model: RegisteredModel, settings: Settings) -> DeploymentsOut:
    rows = list(
        session.scalars(
            select(Deployment)
            .join(DeploymentTarget)
            .where(DeploymentTarget.base_model_id == model.id)
            .order_by(Deployment.id.desc())
            .limit(RECENT)
        )
    )
    out = []
    for target in targets(session, model):
        latest = _latest(session, target)
        fields = {
            k: getattr(target, k)
            for k in ("id", "name", "kind", "url", "served_name", "lora_root", "api_key", "created_at")
        }
        out.append(TargetOut(**fields, latest=to_out(latest) if latest else None))
    return DeploymentsOut(
        model=model.name, current_version=model.current_version, completion_mode=completion_mode(model, settings),
        targets=out, deployments=[to_out(r) for r in rows],
    )  # fmt: skip


def deployed_to(session: Session, versions: list[AdapterVersion]) -> list[dict]:
    """Which targets received which of these versions, and when: for a request's certificate."""
    by_id = {v.version: v for v in versions}
    rows = session.scalars(
        select(Deployment)
        .join(DeploymentTarget)
        .where(
            DeploymentTarget.base_model_id.in_({v.base_model_id for v in versions}),
            Deployment.version.in_(by_id),
            Deployment.delivered_at.is_not(None),
        )
        .order_by(Deployment.delivered_at)
    )
    return [
        {
            "target": r.target.name,
            "kind": r.target.kind,
            "version": r.version,
            "delivered_at": r.delivered_at.isoformat(),
        }
        for r in rows
    ]


def overdue_deployments(session: Session, settings: Settings) -> list[int]:
    return overdue_deliveries(session, settings, Deployment)


def dispatch(deployment_ids: list[int]) -> None:
    send_ids(deployment_ids, enqueue_deployments)


def _remember(session: Session, _context: UOWTransaction) -> None:
    ids = [d.id for d in session.new if isinstance(d, Deployment)]
    if ids:
        session.info.setdefault(UNSENT, []).extend(ids)


def _send(session: Session) -> None:
    dispatch(session.info.pop(UNSENT, []))


def _drop(session: Session) -> None:
    session.info.pop(UNSENT, None)


LISTENERS = (("after_flush", _remember), ("after_commit", _send), ("after_rollback", _drop))


def register_listeners() -> None:
    """Make every Session send the deliveries it added once it commits (idempotent); each process that moves
    `current` calls it, as it does the callbacks' register_listeners."""
    for name, listener in LISTENERS:
        if not event.contains(Session, name, listener):
            event.listen(Session, name, listener)
