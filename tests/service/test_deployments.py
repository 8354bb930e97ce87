"""Deployments on real parts: versions published by the job runner's own publish step and rolled back over the API
are delivered by a Celery worker (Redis) to a vLLM contract server and a webhook receiver on 127.0.0.1, with the
exact unload/load sequence, retries after 500s, signed events, and `deployed` completion."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import replace
from datetime import timedelta

import pytest
import torch
from sqlalchemy import insert

from tests.service import test_callbacks, test_publishing
from tests.service.conftest import auth, register_demo_model
from tests.service.processes import wait_until
from tests.service.vllm_contract import LOAD, UNLOAD, Call, VllmContractServer

pytestmark = pytest.mark.integration

API_KEY_NAME, API_KEY = "vllm-test", "sk-test-vllm"

# The callback tests' receiver and default-queue worker, and the publishing tests' fused version of a real run.
receiver, callback_worker = test_callbacks.receiver, test_callbacks.callback_worker
corpora, fused, job_row = test_publishing.corpora, test_publishing.fused, test_publishing.job_row


@pytest.fixture(scope="module", autouse=True)
def deployment_secret(client, admin_key) -> str:
    """The secret deployment deliveries are signed with: created once, shown once."""
    response = client.post("/v1/deployment-secret", headers=auth(admin_key))
    assert response.status_code == 201, response.text
    return response.json()["secret"]


@pytest.fixture(scope="module")
def vllm():
    server = VllmContractServer(api_key=API_KEY)
    yield server
    server.stop()


@pytest.fixture
def model(client, admin_key, tiny_demo_model) -> str:
    return register_demo_model(client, tiny_demo_model, auth(admin_key))


def publish_version(name: str, fused, corpora, settings) -> tuple[int, str, str]:
    """What train_and_fuse does once its version passed the gate (publish_fused: publish, complete the requests,
    commit, move the store's pointer). Returns (version, request id, the request's status right after)."""
    from app.adapters.service import latest_version
    from app.adapters.store import artifact_store
    from app.base_models.service import get_by_name
    from app.core.db import session_scope
    from app.forget_requests.models import ForgetRequest
    from app.jobs.models import job_key
    from worker.engine import FusionSettings, UnlearnConfig
    from worker.job.claim import JobInputs
    from worker.job.publishing import engine_dict, publish_fused, version_metrics

    job_id, request_id = job_row(name, corpora["forget"], "publishing")
    # the run's statistics and verification under this job's key, as if this job had trained them
    key, (trained,) = job_key(job_id), fused.state.jobs
    version = replace(
        fused,
        state=replace(fused.state, entries={key: fused.state.entries[trained]}),
        verification=replace(
            fused.verification,
            sets={key: fused.verification.sets[trained]},
            items={key: fused.verification.items[trained]},
        ),
    )
    config, fusion = UnlearnConfig(), FusionSettings()
    with session_scope() as session:
        model = get_by_name(session, name)
        inputs = JobInputs(
            job_id=job_id, attempt=0, method="ihl", model_name=name, model_path=model.path,
            tokenizer_path=model.tokenizer_path, weights_sha256=model.weights_sha256, config={},
            forget_items=corpora["forget"], items_per_request=[(request_id, 2)], retain_items=[], holdout_items=[],
            held_sets={},
        )  # fmt: skip
        parent = latest_version(session, model)
    number = publish_fused(
        artifact_store(settings), inputs, parent, version, version_metrics(version, config, fusion),
        engine_dict(config, fusion), {request_id: [{"before": m, "after": m} for m in version.verification.items[key]]},
    )  # fmt: skip
    with session_scope() as session:
        status = session.get(ForgetRequest, uuid.UUID(request_id)).status
    return number, request_id, status


def deployments(client, key: str, name: str) -> dict:
    response = client.get(f"/v1/models/{name}/deployments", headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()


def settled(client, key: str, name: str, count: int) -> bool:
    rows = deployments(client, key, name)["deployments"]
    return len(rows) == count and all(row["state"] != "pending" for row in rows)


def add_target(client, key: str, model_name: str, /, **body: object):
    return client.post(f"/v1/models/{model_name}/deployment-targets", headers=auth(key), json=body)


def test_vllm_follows_current_through_two_publishes_a_failing_server_and_a_rollback(
    client, admin_key, model, vllm, fused, corpora, settings, callback_worker
):
    added = add_target(client, admin_key, model, name="vllm-a", kind="vllm", url=vllm.base, api_key=API_KEY_NAME)
    assert added.status_code == 201, added.text
    assert added.json()["targets"][0]["latest"] is None  # nothing published yet: nothing to deliver
    root = settings.artifact_dir.resolve()
    path = {v: str(root / model / str(v)) for v in (1, 2)}

    assert publish_version(model, fused, corpora, settings)[0] == 1
    wait_until(lambda: settled(client, admin_key, model, 1), 60, "version 1 delivered")
    vllm.fail_next(LOAD, 2)
    assert publish_version(model, fused, corpora, settings)[0] == 2
    wait_until(lambda: settled(client, admin_key, model, 2), 60, "version 2 delivered after two 500s")
    rolled = client.put(
        f"/v1/models/{model}/aliases/current",
        headers=auth(admin_key),
        json={"version": 1, "force": True, "reason": "test: roll back"},
    )
    assert rolled.status_code == 200, rolled.text
    wait_until(lambda: settled(client, admin_key, model, 3), 60, "the rollback delivered")

    unload = {"lora_name": model}
    assert [call for call in vllm.calls if call.body.get("lora_name") == model] == [
        Call(UNLOAD, unload, 404), Call(LOAD, {"lora_name": model, "lora_path": path[1]}, 200),
        Call(UNLOAD, unload, 200), Call(LOAD, {"lora_name": model, "lora_path": path[2]}, 500),
        Call(UNLOAD, unload, 404), Call(LOAD, {"lora_name": model, "lora_path": path[2]}, 500),
        Call(UNLOAD, unload, 404), Call(LOAD, {"lora_name": model, "lora_path": path[2]}, 200),
        Call(UNLOAD, unload, 200), Call(LOAD, {"lora_name": model, "lora_path": path[1]}, 200),
    ]  # fmt: skip
    assert vllm.loaded[model] == path[1]  # the served name shadows the base with version 1 again
    state = deployments(client, admin_key, model)
    rows = [(r["version"], r["event"], r["state"], r["attempts"], r["last_error"]) for r in state["deployments"]]
    assert rows == [
        (1, "alias.moved", "delivered", 1, None),
        (2, "adapter.published", "delivered", 3, None),
        (1, "adapter.published", "delivered", 1, None),
    ]
    assert state["current_version"] == 1 and state["targets"][0]["latest"]["version"] == 1


def test_deployed_mode_completes_a_request_only_once_its_version_reached_every_target(
    client, admin_key, model, vllm, fused, corpora, settings, callback_worker
):
    mode = client.put(
        f"/v1/models/{model}/completion-mode", headers=auth(admin_key), json={"completion_mode": "deployed"}
    )
    assert mode.status_code == 200 and mode.json()["completion_mode"] == "deployed"
    assert (
        add_target(
            client, admin_key, model, name="vllm-b", kind="vllm", url=vllm.base, api_key=API_KEY_NAME
        ).status_code
        == 201
    )
    vllm.fail_next(LOAD, 2)  # the request is read while the target still fails

    version, request_id, status = publish_version(model, fused, corpora, settings)
    assert status == "running"  # published, not yet deployed
    wait_until(lambda: settled(client, admin_key, model, 1), 60, "the version delivered")
    request = client.get(f"/v1/forget-requests/{request_id}", headers=auth(admin_key)).json()
    assert request["status"] == "completed" and request["completed_at"] is not None
    certificate = client.get(f"/v1/forget-requests/{request_id}/certificate", headers=auth(admin_key))
    assert certificate.status_code == 200, certificate.text
    payload = certificate.json()["payload"]
    assert payload["completion_mode"] == "deployed"
    assert [(d["target"], d["kind"], d["version"]) for d in payload["deployed_to"]] == [("vllm-b", "vllm", version)]


def test_a_request_waiting_on_a_failing_target_completes_when_the_mode_goes_back_to_published(
    client, admin_key, model, vllm, fused, corpora, settings, callback_worker
):
    set_mode = f"/v1/models/{model}/completion-mode"
    assert client.put(set_mode, headers=auth(admin_key), json={"completion_mode": "deployed"}).status_code == 200
    assert (
        add_target(client, admin_key, model, name="down", kind="vllm", url=vllm.base, api_key=API_KEY_NAME).status_code
        == 201
    )
    vllm.fail_next(UNLOAD, 1000)  # a server that keeps failing: the delivery keeps being retried
    try:
        _, request_id, status = publish_version(model, fused, corpora, settings)
        assert status == "running"
        wait_until(lambda: deployments(client, admin_key, model)["deployments"][0]["attempts"] >= 2, 60, "retries")
        assert client.get(f"/v1/forget-requests/{request_id}", headers=auth(admin_key)).json()["status"] == "running"
        back = client.put(set_mode, headers=auth(admin_key), json={"completion_mode": None})
        assert back.status_code == 200 and back.json()["completion_mode"] == "published"
        request = client.get(f"/v1/forget-requests/{request_id}", headers=auth(admin_key)).json()
        assert request["status"] == "completed"
    finally:
        vllm.fail_next(UNLOAD, 0)


def test_a_webhook_target_gets_signed_events_with_the_versions_sha256s(
    client, admin_key, model, receiver, fused, corpora, settings, callback_worker, deployment_secret
):
    path = f"/deploy/{uuid.uuid4().hex}"
    assert (
        add_target(client, admin_key, model, name="hook", kind="webhook", url=receiver.base + path).status_code == 201
    )
    version, _, _ = publish_version(model, fused, corpora, settings)
    wait_until(lambda: len(receiver.bodies(path)) == 1, 60, "the adapter.published event")
    manifest = client.get(f"/v1/models/{model}/adapters/{version}", headers=auth(admin_key)).json()["manifest"]

    (post,) = [p for p in receiver.posts if p["path"] == path]
    signature = dict(part.split("=", 1) for part in post["headers"]["X-Unlearnd-Signature"].split(","))
    signed = f"{signature['t']}.{receiver.base + path}.".encode() + post["raw"]
    expected = hmac.new(deployment_secret.encode(), signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(signature["v2"], expected) and abs(time.time() - int(signature["t"])) < 120
    body = json.loads(post["raw"])
    assert body["event"] == "adapter.published" and (body["model"], body["version"]) == (model, version)
    assert body["manifest_url"] == f"/v1/models/{model}/adapters/{version}/files/manifest.json"
    assert body["sha256"] == {name: meta["sha256"] for name, meta in manifest["files"].items()}
    assert corpora["forget"][0].get("text", corpora["forget"][0].get("completion", "")).encode() not in post["raw"]


def test_a_delivery_a_later_move_superseded_is_not_sent(client, admin_key, model, vllm, settings, session):
    from app.base_models.service import get_by_name
    from app.core.db import utcnow
    from app.deployments.delivery import deliver
    from app.deployments.models import Deployment
    from app.deployments.service import targets

    assert add_target(client, admin_key, model, name="vllm-c", kind="vllm", url=vllm.base).status_code == 201
    target_id = targets(session, get_by_name(session, model))[0].id
    now = utcnow()
    ids = [
        session.scalar(  # Core inserts: rows whose messages were never sent, as when the broker was down
            insert(Deployment)
            .values(
                target_id=target_id, version=v, event="alias.moved", occurred_at=now, next_attempt_at=now, attempts=0
            )
            .returning(Deployment.id)
        )  # fmt: skip
        for v in (1, 2)
    ]
    session.commit()
    calls = len(vllm.calls)
    assert deliver(ids[0], settings) is None
    session.expire_all()
    assert session.get(Deployment, ids[0]).state == "superseded" and len(vllm.calls) == calls


def test_two_workers_never_send_to_one_target_at_once(client, admin_key, model, vllm, settings, session):
    """A delivery waits for the target's lock, so an earlier move's calls never interleave with a later one's."""
    from app.base_models.service import get_by_name
    from app.core.db import utcnow
    from app.deployments.delivery import deliver, target_lock
    from app.deployments.models import Deployment
    from app.deployments.service import targets

    assert (
        add_target(
            client, admin_key, model, name="vllm-d", kind="vllm", url=vllm.base, api_key=API_KEY_NAME
        ).status_code
        == 201
    )
    target_id = targets(session, get_by_name(session, model))[0].id
    now = utcnow()
    row = session.scalar(
        insert(Deployment).values(target_id=target_id, version=1, event="alias.moved", occurred_at=now,
                                  next_attempt_at=now, attempts=0).returning(Deployment.id)
    )  # fmt: skip
    session.commit()
    mine = lambda: [c for c in vllm.calls if c.body.get("lora_name") == model]  # noqa: E731
    with target_lock(target_id):  # another worker is sending to this target
        worker = threading.Thread(target=deliver, args=(row, settings))
        worker.start()
        worker.join(2)
        assert worker.is_alive() and mine() == []
    worker.join(30)
    assert not worker.is_alive() and [c.path for c in mine()] == [UNLOAD, LOAD], mine()


def test_a_deployment_whose_message_was_lost_is_sent_by_the_sweep(
    client, admin_key, model, receiver, fused, corpora, settings, session, callback_worker
):
    from app.base_models.service import get_by_name
    from app.core.db import utcnow
    from app.deployments.models import Deployment
    from app.deployments.service import targets
    from worker.tasks import redeliver_deployments

    path = f"/lost/{uuid.uuid4().hex}"
    version, _, _ = publish_version(model, fused, corpora, settings)
    assert (
        add_target(client, admin_key, model, name="late", kind="webhook", url=receiver.base + path).status_code == 201
    )
    wait_until(lambda: len(receiver.bodies(path)) == 1, 60, "the new target's first delivery")
    overdue = utcnow() - timedelta(minutes=5)
    target_id = targets(session, get_by_name(session, model))[0].id
    lost = session.scalar(
        insert(Deployment).values(target_id=target_id, version=version, event="alias.moved", occurred_at=overdue,
                                  next_attempt_at=overdue, attempts=0).returning(Deployment.id)
    )  # fmt: skip
    session.commit()
    assert lost in redeliver_deployments()
    wait_until(lambda: len(receiver.bodies(path)) == 2, 60, "the swept delivery")
    assert receiver.bodies(path)[1]["id"] == lost


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"name": "x", "kind": "vllm", "url": "http://169.254.169.254/"}, 422, "host_not_allowed"),
        ({"name": "x", "kind": "webhook", "url": "ftp://127.0.0.1/x"}, 422, "scheme"),
        ({"name": "x", "kind": "webhook", "url": "http://127.0.0.1:9/x", "served_name": "m"}, 422, None),
        ({"name": "x", "kind": "vllm", "url": "http://127.0.0.1:9", "api_key": "nope"}, 422, None),
        ({"name": "x", "kind": "triton", "url": "http://127.0.0.1:9"}, 422, None),
    ],
)
def test_bad_targets_are_refused(client, admin_key, model, body, status, reason):
    response = add_target(client, admin_key, model, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    if reason:
        assert error["details"]["reason"] == reason


def test_targets_need_admin_and_a_name_is_taken_once(client, admin_key, writer_key, model):
    body = {"name": "dup", "kind": "webhook", "url": "http://127.0.0.1:9/x"}
    assert add_target(client, writer_key, model, **body).status_code == 403
    assert add_target(client, admin_key, model, **body).status_code == 201
    assert add_target(client, admin_key, model, **body).status_code == 409
    assert client.delete(f"/v1/models/{model}/deployment-targets/dup", headers=auth(admin_key)).status_code == 204
    assert client.delete(f"/v1/models/{model}/deployment-targets/dup", headers=auth(admin_key)).status_code == 404


def test_an_export_job_writes_the_merged_checkpoint_into_the_store_with_the_gate_rechecked(
    client, admin_key, model, fused, corpora, settings
):
    from transformers import AutoModelForCausalLM

    from app.adapters.store import MANIFEST
    from worker.merged_export import run_export

    version, _, _ = publish_version(model, fused, corpora, settings)
    queued = client.post(f"/v1/models/{model}/exports", headers=auth(admin_key), json={"dtype": "base"})
    assert queued.status_code == 202, queued.text
    assert (queued.json()["status"], queued.json()["version"]) == ("queued", version)
    export_id = queued.json()["id"]
    run_export(export_id, settings)  # what the gpu queue's worker runs for the message
    done = client.get(f"/v1/models/{model}/exports/{export_id}", headers=auth(admin_key)).json()
    assert done["status"] == "succeeded", done["error"]
    manifest = done["manifest"]
    assert (manifest["version"], manifest["dtype"]) == (version, "float32")
    published = client.get(f"/v1/models/{model}/adapters/{version}", headers=auth(admin_key)).json()
    assert manifest["adapter_files"] == published["manifest"]["files"]  # linked to exactly the version's adapter
    metrics = manifest["metrics"]
    assert metrics["rechecked_sets"] == list(published["metrics"]["verification"]["sets"])
    assert max(metrics["drift"].values()) <= metrics["tolerance"] == 1e-3
    folder = settings.artifact_dir / model / "exports" / str(export_id)
    assert done["artifact_uri"] == folder.resolve().as_uri()
    assert {*manifest["files"], MANIFEST} == {p.name for p in folder.iterdir()}
    assert AutoModelForCausalLM.from_pretrained(folder).dtype == torch.float32
    missing = client.post(f"/v1/models/{model}/exports", headers=auth(admin_key), json={"version": 99})
    assert missing.status_code == 404


def test_export_merged_cli_writes_a_bf16_checkpoint_that_reproduces_the_versions_metrics(
    model, fused, corpora, settings, tmp_path
):
    from typer.testing import CliRunner

    from worker.cli import cli

    version, _, _ = publish_version(model, fused, corpora, settings)
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["export-merged", model, str(out), "--version", str(version)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["model"], manifest["version"], manifest["dtype"]) == (model, version, "bfloat16")
    assert max(manifest["metrics"]["drift"].values()) <= 1e-2
    assert any(name.endswith(".safetensors") for name in manifest["files"])
    assert CliRunner().invoke(cli, ["export-merged", model, str(out)]).exit_code != 0  # never into a full folder
    missing = CliRunner().invoke(cli, ["export-merged", model, str(tmp_path / "none"), "--version", "99"])
    assert missing.exit_code == 1 and not (tmp_path / "none").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no partial folder left behind
