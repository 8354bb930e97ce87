"""Rolling `current` back is a compliance action: a version that does not fuse the job of a completed request would
bring its records back, so moving to it answers 409 unless an admin forces it with a reason (audited)."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import select

from tests.service.conftest import auth, register_demo_model


@pytest.fixture(scope="module")
def covered(client, admin_key, tiny_demo_model, settings, tmp_path_factory) -> dict:
    """Version 1 fuses job A, version 2 jobs A and B, version 3 again A and B; A's and B's requests completed."""
    name = register_demo_model(client, tiny_demo_model, auth(admin_key))
    from app.adapters.models import AdapterVersion
    from app.adapters.store import artifact_store
    from app.auth.models import ApiKey
    from app.base_models.service import get_by_name
    from app.core.db import session_scope, utcnow
    from app.forget_requests.models import ForgetRequest
    from app.jobs.models import UnlearningJob, job_key

    store = artifact_store(settings)
    with session_scope() as session:
        model = get_by_name(session, name)
        jobs, requests = [], []
        for _ in range(2):
            request = ForgetRequest(
                id=uuid.uuid4(), api_key_id=session.scalars(select(ApiKey.id)).first(),
                subject_request_id=f"dsr-{uuid.uuid4().hex}", base_model_id=model.id, body_sha256="0" * 64,
                status="completed", item_sha256s=["0" * 64], due_at=utcnow(), completed_at=utcnow(),
            )  # fmt: skip
            job = UnlearningJob(base_model_id=model.id, method="ihl", config={}, status="succeeded", requests=[request])
            session.add(job)
            session.flush()
            jobs.append(job)
            requests.append(str(request.id))
        fused = [[jobs[0]], jobs, jobs]
        for version, members in enumerate(fused, start=1):
            publisher = (
                members[-1] if version < 3 else UnlearningJob(base_model_id=model.id, method="ihl", status="succeeded")
            )
            session.add(publisher)
            session.flush()
            source = tmp_path_factory.mktemp(f"v{version}")
            (source / "adapter_config.json").write_text(json.dumps({"r": version}))
            manifest = store.publish(name, version, source, {"jobs": [job_key(j.id) for j in members]})
            session.add(
                AdapterVersion(
                    base_model_id=model.id, version=version, parent_version=version - 1 or None, job_id=publisher.id,
                    artifact_uri=store.uri(name, version), manifest=manifest, metrics={},
                )
            )  # fmt: skip
        model.current_version = 3
        session.commit()
    store.set_alias(name, "current", 3)
    return {"model": name, "requests": requests}


def move(client, key: str, model: str, **body: object):
    return client.put(f"/v1/models/{model}/aliases/current", headers=auth(key), json=body)


def test_rolling_back_below_a_completed_requests_version_is_409(client, admin_key, covered, settings):
    from app.adapters.store import artifact_store

    refused = move(client, admin_key, covered["model"], version=1)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "conflict"
    assert error["details"] == {"uncovered_request_ids": [covered["requests"][1]], "uncovered": 1}
    models = {m["name"]: m for m in client.get("/v1/models", headers=auth(admin_key)).json()}
    assert models[covered["model"]]["current_version"] == 3
    assert artifact_store(settings).get_alias(covered["model"], "current") == 3


def test_a_version_that_covers_every_completed_request_needs_no_force(client, admin_key, covered):
    assert move(client, admin_key, covered["model"], version=2).status_code == 200
    assert move(client, admin_key, covered["model"], version=3).status_code == 200


def test_force_needs_a_reason(client, admin_key, covered):
    response = move(client, admin_key, covered["model"], version=1, force=True)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_input"


def test_a_forced_rollback_is_audited_with_its_reason_and_the_requests_it_uncovers(
    client, admin_key, covered, session, settings
):
    from app.adapters.store import artifact_store
    from app.audit.models import AuditEvent

    reason = "INC-42: version 2 breaks the retain set in production"
    forced = move(client, admin_key, covered["model"], version=1, force=True, reason=reason)
    assert forced.status_code == 200, forced.text
    assert artifact_store(settings).get_alias(covered["model"], "current") == 1
    event = session.scalars(
        select(AuditEvent).where(AuditEvent.action == "adapter.alias_moved").order_by(AuditEvent.id.desc())
    ).first()
    assert event.data["forced"] is True and event.data["reason"] == reason
    assert event.data["uncovered_request_ids"] == [covered["requests"][1]]
    assert move(client, admin_key, covered["model"], version=3).status_code == 200
