"""Adapter versions over the API: listing, manifests, verified downloads and the `current` alias."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select

from tests.service.conftest import auth, register_demo_model
from tests.service.rows import published_versions


@pytest.fixture(scope="module")
def two_versions(client, admin_key, tiny_demo_model, settings, tmp_path_factory):
    """Versions 1 and 2 of a model of this module's own, published through the real store with their rows
    committed."""
    registered_model = register_demo_model(client, tiny_demo_model, auth(admin_key))
    published_versions(settings, registered_model, tmp_path_factory.mktemp("versions"))
    return registered_model


def test_versions_are_listed_with_their_manifests(client, reader_key, two_versions):
    listed = client.get(f"/v1/models/{two_versions}/adapters", headers=auth(reader_key)).json()
    assert [v["version"] for v in listed] == [1, 2]
    detail = client.get(f"/v1/models/{two_versions}/adapters/2", headers=auth(reader_key)).json()
    assert set(detail["manifest"]["files"]) == {"adapter_config.json", "adapter_model.safetensors"}


def test_download_streams_the_file_with_its_sha256(client, reader_key, two_versions):
    response = client.get(
        f"/v1/models/{two_versions}/adapters/2/files/adapter_model.safetensors", headers=auth(reader_key)
    )
    assert response.status_code == 200
    assert response.content == bytes(range(256)) * 2
    assert response.headers["x-content-sha256"] == hashlib.sha256(response.content).hexdigest()


def test_unknown_version_and_file_are_404(client, reader_key, two_versions):
    assert client.get(f"/v1/models/{two_versions}/adapters/9", headers=auth(reader_key)).status_code == 404
    missing = client.get(f"/v1/models/{two_versions}/adapters/1/files/secrets.txt", headers=auth(reader_key))
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_rollback_moves_the_alias_in_database_and_store_with_an_audit_event(
    client, admin_key, two_versions, settings, session
):
    from app.adapters.store import artifact_store
    from app.audit.models import AuditEvent

    response = client.put(f"/v1/models/{two_versions}/aliases/current", headers=auth(admin_key), json={"version": 1})
    assert response.status_code == 200, response.text
    assert response.json() == {"model": two_versions, "alias": "current", "version": 1}
    models = {m["name"]: m for m in client.get("/v1/models", headers=auth(admin_key)).json()}
    assert models[two_versions]["current_version"] == 1
    assert artifact_store(settings).get_alias(two_versions, "current") == 1
    event = session.scalars(
        select(AuditEvent).where(AuditEvent.action == "adapter.alias_moved").order_by(AuditEvent.id.desc())
    ).first()
    assert event.data == {
        "alias": "current", "previous": 2, "version": 1, "forced": False, "reason": None, "uncovered_request_ids": []
    }  # fmt: skip
    client.put(f"/v1/models/{two_versions}/aliases/current", headers=auth(admin_key), json={"version": 2})
    assert artifact_store(settings).get_alias(two_versions, "current") == 2


def test_alias_to_a_missing_version_is_404_and_needs_admin(client, admin_key, writer_key, two_versions):
    missing = client.put(f"/v1/models/{two_versions}/aliases/current", headers=auth(admin_key), json={"version": 7})
    assert missing.status_code == 404
    forbidden = client.put(f"/v1/models/{two_versions}/aliases/current", headers=auth(writer_key), json={"version": 1})
    assert forbidden.status_code == 403


def test_unmerge_refuses_a_job_of_another_model_or_not_succeeded(client, admin_key, two_versions, session):
    from app.base_models.service import get_by_name
    from app.jobs.models import UnlearningJob

    response = client.post(f"/v1/models/{two_versions}/unmerge", headers=auth(admin_key), json={"job_id": 999999})
    assert response.status_code == 404
    model_id = get_by_name(session, two_versions).id
    job = session.scalars(
        select(UnlearningJob).where(UnlearningJob.base_model_id == model_id, UnlearningJob.status == "succeeded")
    ).first()
    job.status = "failed"
    session.commit()
    refused = client.post(f"/v1/models/{two_versions}/unmerge", headers=auth(admin_key), json={"job_id": job.id})
    assert refused.status_code == 409


def test_unmerge_refuses_a_job_the_latest_adapter_does_not_contain(client, admin_key, two_versions, session):
    from app.base_models.service import get_by_name
    from app.jobs.models import UnlearningJob

    model_id = get_by_name(session, two_versions).id
    job = UnlearningJob(base_model_id=model_id, method="ihl", config={}, status="succeeded")
    session.add(job)
    session.commit()
    refused = client.post(f"/v1/models/{two_versions}/unmerge", headers=auth(admin_key), json={"job_id": job.id})
    assert refused.status_code == 409
    assert refused.json()["error"]["details"] == {"jobs": []}
