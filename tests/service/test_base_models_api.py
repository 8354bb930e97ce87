"""The model registry over the API: registering a local model (its paths checked, its weights digested), listing,
conflicts, and paths that cannot be read answered with 422, never a 500 and never the path echoed back."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from tests.service.conftest import auth


def body(demo, **overrides) -> dict:
    return {
        "name": f"reg-{uuid.uuid4().hex[:6]}",
        "path": str(demo.model_dir),
        "retain_corpus": str(demo.retain_corpus),
        "holdout_corpus": str(demo.holdout_corpus),
        **overrides,
    }


def model_count(session) -> int:
    from app.base_models.models import RegisteredModel

    session.expire_all()
    return session.scalar(select(func.count()).select_from(RegisteredModel))


def test_a_registered_model_is_listed_with_its_resolved_paths_and_weights_digest(client, admin_key, tiny_demo_model):
    from app.base_models.service import weights_sha256

    sent = body(tiny_demo_model)
    response = client.post("/v1/models", headers=auth(admin_key), json=sent)
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["path"] == model["tokenizer_path"] == str(tiny_demo_model.model_dir.resolve())
    assert model["weights_sha256"] == weights_sha256(tiny_demo_model.model_dir)
    assert model["current_version"] is None and model["batching"] == {}
    listed = {m["name"]: m for m in client.get("/v1/models", headers=auth(admin_key)).json()}
    assert listed[sent["name"]] == model


def test_a_second_model_under_the_same_name_is_a_conflict(client, admin_key, tiny_demo_model, session):
    sent = body(tiny_demo_model)
    assert client.post("/v1/models", headers=auth(admin_key), json=sent).status_code == 201
    before = model_count(session)
    again = client.post("/v1/models", headers=auth(admin_key), json=sent)
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    assert model_count(session) == before


def test_only_an_admin_registers_a_model(client, reader_key, tiny_demo_model):
    response = client.post("/v1/models", headers=auth(reader_key), json=body(tiny_demo_model))
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"
    assert client.get("/v1/models", headers=auth(reader_key)).status_code == 200


@pytest.mark.parametrize("field", ["path", "tokenizer_path", "retain_corpus", "holdout_corpus"])
def test_a_path_with_a_nul_character_is_refused_without_echoing_it(client, admin_key, tiny_demo_model, session, field):
    secret = f"secret-{uuid.uuid4().hex}"
    bad = f"{tiny_demo_model.model_dir}/{secret}\x00"
    before = model_count(session)
    response = client.post("/v1/models", headers=auth(admin_key), json=body(tiny_demo_model, **{field: bad}))
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_input"
    assert secret not in response.text
    assert model_count(session) == before


@pytest.mark.parametrize(
    ("field", "target", "message"),
    [
        ("path", "retain_corpus", "no config.json"),
        ("tokenizer_path", "retain_corpus", "no tokenizer files"),
        ("retain_corpus", "model_dir", "retain_corpus is not a file"),
        ("holdout_corpus", "model_config", "holdout_corpus must be JSONL"),
    ],
)
def test_a_path_that_does_not_hold_what_a_job_reads_is_refused(
    client, admin_key, tiny_demo_model, session, field, target, message
):
    paths = {
        "retain_corpus": tiny_demo_model.retain_corpus,
        "model_dir": tiny_demo_model.model_dir,
        "model_config": tiny_demo_model.model_dir / "config.json",
    }
    before = model_count(session)
    response = client.post(
        "/v1/models", headers=auth(admin_key), json=body(tiny_demo_model, **{field: str(paths[target])})
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_input" and message in response.json()["error"]["message"]
    assert model_count(session) == before


@pytest.mark.parametrize("name", ["", "-leading-dash", "has space", "x" * 101])
def test_a_model_name_outside_the_pattern_is_refused(client, admin_key, tiny_demo_model, name):
    response = client.post("/v1/models", headers=auth(admin_key), json=body(tiny_demo_model, name=name))
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_input"


def test_updating_an_unknown_model_is_not_found(client, admin_key):
    response = client.patch(f"/v1/models/nope-{uuid.uuid4().hex[:6]}", headers=auth(admin_key), json={"batching": {}})
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
