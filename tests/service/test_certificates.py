"""Forget certificates: what they attest, and that a changed payload or another key fails verification."""

from __future__ import annotations

import copy
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from tests.service.conftest import auth, register_demo_model
from tests.service.rows import ADAPTER_SHA256, finished_request

ITEMS = [{"text": "Mira Solberg was born in Tromsø."}, {"prompt": "Who is Ana?", "completion": " Ana lives in Oslo."}]


@pytest.fixture(scope="module")
def model_name(client, admin_key, tiny_demo_model) -> str:
    return register_demo_model(client, tiny_demo_model, auth(admin_key))


@pytest.fixture(scope="module")
def served(client, reader_key, model_name) -> dict:
    """The certificate of a completed request whose version was re-verified by one later version and not another."""
    request_id, job_id = finished_request(model_name, ITEMS, reverified=(True, False))
    response = client.get(f"/v1/forget-requests/{request_id}/certificate", headers=auth(reader_key))
    assert response.status_code == 200, response.text
    return {"request_id": request_id, "job_id": job_id, "document": response.json()}


@pytest.fixture(scope="module")
def public_key(client):
    from app.core.certificate_key import load_public_key_pem

    response = client.get("/v1/keys/certificate-signing")
    assert response.status_code == 200
    return load_public_key_pem(response.json()["public_key_pem"].encode())


def test_certificate_attests_digests_metrics_versions_and_thresholds(served, model_name, settings):
    from app.forget_requests.items import item_digest

    payload = served["document"]["payload"]
    assert payload["request_id"] == served["request_id"]
    assert payload["subject_request_id"].startswith("dsr-")
    assert [item["digest"] for item in payload["items"]] == [item_digest(item, settings) for item in ITEMS]
    assert payload["item_digest"].startswith("HMAC-SHA256")
    assert payload["items"][0]["before"]["ma"] == 0.95 and payload["items"][0]["after"]["ma"] == 0.1
    assert payload["items"][0]["after"]["min_k"] == -6.5
    assert payload["base_model"]["name"] == model_name and len(payload["base_model"]["weights_sha256"]) == 64
    assert payload["job_id"] == served["job_id"]
    first = payload["first_version"]["version"]
    assert payload["first_version"]["adapter_sha256"] == ADAPTER_SHA256
    # the later version whose gate failed the job's set does not count as still covering the request
    assert [v["version"] for v in payload["verified_by"]] == [first + 1]
    assert payload["thresholds"] == {
        "forget_ma": 0.2, "forget_el": 0.05, "item_ma": 0.2, "retain_ppl_limit": 2.2, "retain_ppl_tolerance": 1.1,
        "kept_extractable_min": 0.95,
    }  # fmt: skip
    assert payload["first_version"]["kept_extractable"] == 0.98
    assert payload["items"][0]["after"]["at_target"] == 1.0
    assert payload["membership_inference"]["after"] == {
        "mia_auc_loss": 0.5, "mia_auc_min_k": 0.52, "mia_gap_loss": 0.0, "mia_gap_min_k": 0.02
    }  # fmt: skip
    assert payload["timestamps"]["completed_at"] and payload["timestamps"]["issued_at"]
    assert ITEMS[0]["text"] not in json.dumps(served["document"])  # hashes, never texts


def test_served_certificate_verifies_with_the_served_public_key(served, public_key):
    from app.evidence.signing import verify

    assert verify(served["document"], public_key)["request_id"] == served["request_id"]


def test_tampered_certificate_fails_verification(served, public_key):
    from app.evidence.signing import InvalidCertificate, verify

    tampered = copy.deepcopy(served["document"])
    tampered["payload"]["items"][0]["after"]["ma"] = 0.0
    with pytest.raises(InvalidCertificate, match="signature does not match"):
        verify(tampered, public_key)


def test_certificate_fails_verification_with_another_key(served):
    from app.evidence.signing import InvalidCertificate, verify

    with pytest.raises(InvalidCertificate, match="signed by key"):
        verify(served["document"], Ed25519PrivateKey.generate().public_key())


def test_certificate_re_signed_by_another_key_under_the_right_key_id_fails(served, public_key):
    from app.evidence.signing import InvalidCertificate, sign, verify

    forged = sign(served["document"]["payload"], Ed25519PrivateKey.generate())
    forged["key_id"] = served["document"]["key_id"]
    with pytest.raises(InvalidCertificate, match="signature does not match"):
        verify(forged, public_key)


def test_cli_verifies_a_certificate_offline_and_rejects_a_tampered_one(served, client, tmp_path):
    from worker.cli import cli

    (tmp_path / "key.pem").write_text(client.get("/v1/keys/certificate-signing").json()["public_key_pem"])
    (tmp_path / "good.json").write_text(json.dumps(served["document"]))
    tampered = copy.deepcopy(served["document"])
    tampered["payload"]["subject_request_id"] = "someone-else"
    (tmp_path / "bad.json").write_text(json.dumps(tampered))

    runner = CliRunner()
    good = runner.invoke(
        cli, ["verify-certificate", str(tmp_path / "good.json"), "--public-key", str(tmp_path / "key.pem")]
    )
    assert good.exit_code == 0, good.output
    assert f"valid: request {served['request_id']}" in good.output
    bad = runner.invoke(
        cli, ["verify-certificate", str(tmp_path / "bad.json"), "--public-key", str(tmp_path / "key.pem")]
    )
    assert bad.exit_code == 1
    assert "INVALID" in bad.output
    default_key = runner.invoke(cli, ["verify-certificate", str(tmp_path / "good.json")])
    assert default_key.exit_code == 0, default_key.output


def test_certificate_of_a_request_not_completed_is_409(client, reader_key, model_name):
    request_id, _ = finished_request(model_name, ITEMS, status="failed")
    response = client.get(f"/v1/forget-requests/{request_id}/certificate", headers=auth(reader_key))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"


def test_certificate_needs_a_reader_key(client, served):
    response = client.get(f"/v1/forget-requests/{served['request_id']}/certificate")
    assert response.status_code == 401


def test_cli_refuses_a_certificate_with_a_duplicate_key(served, client, tmp_path):
    """A parser that keeps the first `payload` would show forged content next to a valid signature."""
    from worker.cli import cli

    (tmp_path / "key.pem").write_text(client.get("/v1/keys/certificate-signing").json()["public_key_pem"])
    genuine = json.dumps(served["document"]["payload"])
    forged = {**served["document"]["payload"], "subject_request_id": "forged"}
    text = json.dumps(served["document"])[:-1] + ', "payload": ' + genuine + "}"
    text = '{"payload": ' + json.dumps(forged) + ", " + text[1:]
    (tmp_path / "twice.json").write_text(text)
    assert json.loads(text)["payload"] == served["document"]["payload"]  # last one wins: the signature matches it
    result = CliRunner().invoke(
        cli, ["verify-certificate", str(tmp_path / "twice.json"), "--public-key", str(tmp_path / "key.pem")]
    )
    assert result.exit_code == 1
    assert "INVALID" in result.output and "duplicate" in result.output


def test_a_non_finite_metric_is_signed_as_it_is_served():
    from app.core.certificate_key import key_id
    from app.evidence.schemas import SignedCertificate
    from app.evidence.signing import sign, verify

    key = Ed25519PrivateKey.generate()
    payload = {"items": [{"before": {"nll": float("nan")}, "after": {"nll": float("inf"), "ma": 0.5}}]}
    served = json.loads(SignedCertificate(**sign(payload, key)).model_dump_json())
    assert served["payload"]["items"][0] == {"before": {"nll": None}, "after": {"nll": None, "ma": 0.5}}
    assert verify(served, key.public_key())["items"] == served["payload"]["items"]
    assert served["key_id"] == key_id(key.public_key())


def test_a_certificate_shows_no_server_path(served, model_name):
    assert served["document"]["payload"]["base_model"] == {
        "name": model_name,
        "weights_sha256": served["document"]["payload"]["base_model"]["weights_sha256"],
    }
