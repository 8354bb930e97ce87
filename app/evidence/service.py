"""Forget certificates: what a completed request's evidence says, built from the database and the published
versions' manifests and metrics, signed with the installation's Ed25519 key."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from app.adapters.models import AdapterVersion
from app.core.certificate_key import key_id, public_key_pem, signing_key
from app.core.config import Settings
from app.core.db import utcnow
from app.core.errors import Conflict
from app.deployments.service import completion_mode, deployed_to
from app.evidence.coverage import coverage
from app.evidence.schemas import SignedCertificate, SigningKeyOut
from app.evidence.signing import ALGORITHM, sign
from app.forget_requests.models import ForgetRequest, RequestStatus
from app.jobs.models import job_key

FORMAT = "unlearnd.forget-certificate/2"
ITEM_DIGEST = "HMAC-SHA256(item digest key, sha256(canonical JSON of the item))"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MIA_METRICS = ("mia_auc_loss", "mia_auc_min_k", "mia_gap_loss", "mia_gap_min_k")  # the gaps are |AUC - 0.5|


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _version_entry(version: AdapterVersion, key: str) -> dict:
    return {
        "version": version.version,
        "created_at": _iso(version.created_at),
        "adapter_sha256": version.manifest.get("files", {}).get(ADAPTER_WEIGHTS, {}).get("sha256"),
        "verification": version.metrics.get("verification", {}).get("sets", {}).get(key),
        # collateral: the share of the retain records the base reproduces that this version still reproduces
        "kept_extractable": version.metrics.get("verification", {}).get("kept_extractable"),
    }


def certificate_payload(session: Session, request: ForgetRequest, now: datetime, settings: Settings) -> dict:
    """Everything the certificate attests, as plain JSON values (so its canonical form is what gets served)."""
    if request.status != RequestStatus.completed:
        raise Conflict(
            f"request is {request.status}; only a completed request has a certificate", {"status": request.status}
        )
    covered = coverage(session, request)
    if covered is None:
        raise Conflict("no published version covers this request", {"status": request.status})
    key, first = job_key(covered.job.id), covered.first
    job_metrics = first.metrics.get("job", {})
    items = zip(request.item_sha256s, request.item_metrics or [], strict=True)
    return {
        "format": FORMAT,
        "request_id": str(request.id),
        "subject_request_id": request.subject_request_id,
        # the weights' digest identifies the model; its server path is not the tenant's business
        "base_model": {
            "name": request.base_model.name,
            "weights_sha256": first.manifest.get("base_model", {}).get("weights_sha256"),
        },
        "item_digest": ITEM_DIGEST,
        "items": [{"digest": digest, "before": m["before"], "after": m["after"]} for digest, m in items],
        "membership_inference": {
            side: {name: job_metrics.get(side, {}).get(name) for name in MIA_METRICS} for side in ("before", "after")
        },
        "job_id": covered.job.id,
        "first_version": _version_entry(first, key),
        "verified_by": [_version_entry(v, key) for v in covered.reverified],
        "completion_mode": completion_mode(request.base_model, settings),
        "deployed_to": deployed_to(session, [first, *covered.reverified]),
        "thresholds": {
            **job_metrics.get("target", {}),
            "retain_ppl_limit": first.metrics.get("verification", {}).get("retain_ppl_limit"),
            "retain_ppl_tolerance": first.metrics.get("retain_ppl_tolerance"),
            "kept_extractable_min": first.metrics.get("verification", {}).get("kept_extractable_min"),
        },
        "timestamps": {
            "received_at": _iso(request.received_at),
            "due_at": _iso(request.due_at),
            "completed_at": _iso(request.completed_at),
            "shredded_at": _iso(request.shredded_at),
            "issued_at": _iso(now),
        },
    }


def certificate(session: Session, request: ForgetRequest, settings: Settings) -> SignedCertificate:
    return SignedCertificate(**sign(certificate_payload(session, request, utcnow(), settings), signing_key(settings)))


def public_signing_key(settings: Settings) -> SigningKeyOut:
    public = signing_key(settings).public_key()
    return SigningKeyOut(algorithm=ALGORITHM, key_id=key_id(public), public_key_pem=public_key_pem(public))
