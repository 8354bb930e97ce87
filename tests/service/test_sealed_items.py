"""Items at rest: envelope-encrypted per request, with keys from the settings or generated once under data_dir."""

from __future__ import annotations

import base64
import stat
import uuid

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.orm import Session

from tests.service.conftest import auth


def test_sealed_value_opens_only_with_its_master_key_and_context():
    from app.core.envelope import EnvelopeError, open_envelope, seal

    master, context = b"k" * 32, uuid.uuid4().bytes
    envelope = seal(b"Mira Solberg was born in Troms\xc3\xb8.", master, context)
    assert open_envelope(envelope, master, context) == "Mira Solberg was born in Tromsø.".encode()
    assert b"Mira" not in envelope.ciphertext + envelope.wrapped_key
    with pytest.raises(EnvelopeError):
        open_envelope(envelope, b"x" * 32, context)
    with pytest.raises(EnvelopeError):
        open_envelope(envelope, master, uuid.uuid4().bytes)  # moved to another row


def test_tampered_ciphertext_does_not_open():
    from app.core.envelope import Envelope, EnvelopeError, open_envelope, seal

    envelope = seal(b"a record", b"k" * 32, b"row")
    flipped = bytes([envelope.ciphertext[0] ^ 1]) + envelope.ciphertext[1:]
    with pytest.raises(EnvelopeError):
        open_envelope(Envelope(flipped, envelope.nonce, envelope.wrapped_key), b"k" * 32, b"row")


def test_unconfigured_keys_are_generated_once_with_owner_only_permissions(tmp_path):
    from app.core.config import Settings
    from app.core.keys import MASTER_KEY_FILE, SIGNING_KEY_FILE, key_id, master_key, signing_key

    settings = Settings(data_dir=tmp_path)
    first_master, first_signing = master_key(settings), signing_key(settings)
    assert len(first_master) == 32
    for name in (MASTER_KEY_FILE, SIGNING_KEY_FILE):
        assert stat.S_IMODE((tmp_path / "keys" / name).stat().st_mode) == 0o600
    assert master_key(settings) == first_master
    assert key_id(signing_key(settings).public_key()) == key_id(first_signing.public_key())
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == sorted([MASTER_KEY_FILE, SIGNING_KEY_FILE])


def test_configured_keys_are_used_and_malformed_ones_refused(tmp_path):
    from app.core.config import Settings
    from app.core.keys import KeyConfigurationError, master_key, signing_key

    (tmp_path / "master").write_text(base64.b64encode(b"m" * 32).decode() + "\n")
    assert master_key(Settings(data_dir=tmp_path, master_key_file=tmp_path / "master")) == b"m" * 32
    assert not (tmp_path / "keys").exists()
    with pytest.raises(KeyConfigurationError, match="32 bytes"):
        master_key(Settings(data_dir=tmp_path, master_key=base64.b64encode(b"short").decode()))
    with pytest.raises(KeyConfigurationError, match="PEM"):
        signing_key(Settings(data_dir=tmp_path, signing_key="not a key"))
    with pytest.raises(KeyConfigurationError, match="cannot read"):
        signing_key(Settings(data_dir=tmp_path, signing_key_file=tmp_path / "missing.pem"))


def test_submitted_items_are_stored_only_encrypted(client, writer_key, registered_model, settings):
    from app.core.db import get_engine
    from app.forget_requests.items import item_sha256, open_items
    from app.forget_requests.models import ForgetRequest

    canary = f"canary-{uuid.uuid4().hex}"
    items = [{"text": f"{canary} lives at 4 Elm Road."}, {"prompt": f"Who is {canary}?", "completion": " A baker."}]
    body = {"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": registered_model, "items": items}
    response = client.post("/v1/forget-requests", headers=auth(writer_key), json=body)
    assert response.status_code == 201, response.text
    assert client.post("/v1/forget-requests", headers=auth(writer_key), json=body).status_code == 200  # replay
    with get_engine().connect() as connection:
        row = connection.execute(
            sa.text("SELECT CAST(forget_requests AS text) FROM forget_requests WHERE id = :id"),
            {"id": response.json()["id"]},
        ).scalar_one()
    assert canary not in row and canary.encode().hex() not in row
    with Session(get_engine()) as session:
        request = session.get(ForgetRequest, uuid.UUID(response.json()["id"]))
        assert request.item_sha256s == [item_sha256(item) for item in items]
        assert open_items(request, settings) == items


def test_migration_seals_existing_clear_text_items_and_downgrade_restores_them(tmp_path, settings):
    from app.core.db import make_engine
    from app.forget_requests.items import item_sha256, open_items
    from app.forget_requests.models import ForgetRequest
    from app.migrate import alembic_config, upgrade

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    upgrade(url, "0002")
    engine = make_engine(url)
    request_id, items = uuid.uuid4(), [{"text": "an old clear-text record"}]
    now = "2026-01-01 00:00:00.000000"
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO api_keys (id, name, key_hash, prefix, scopes, created_at) "
                "VALUES (1, 'k', 'h', 'p', '[]', :now)"
            ),
            {"now": now},
        )
        connection.execute(
            sa.text(
                "INSERT INTO base_models (id, name, path, tokenizer_path, weights_sha256, retain_corpus, "
                "holdout_corpus, engine_config, created_at) VALUES (1, 'm', 'p', 'p', 'w', 'r', 'h', '{}', :now)"
            ),
            {"now": now},
        )
        connection.execute(
            sa.text(
                "INSERT INTO forget_requests (id, api_key_id, subject_request_id, base_model_id, items, body_sha256, "
                "status, received_at, due_at, attempts) VALUES (:id, 1, 's', 1, :items, 'd', 'pending', :now, :now, 0)"
            ),
            {"id": request_id.hex, "items": '[{"text": "an old clear-text record"}]', "now": now},
        )
    upgrade(url)
    with Session(engine) as session:
        request = session.get(ForgetRequest, request_id)
        assert request.item_sha256s == [item_sha256(items[0])]
        assert open_items(request, settings) == items
    assert "items" not in {column["name"] for column in sa.inspect(engine).get_columns("forget_requests")}

    command.downgrade(alembic_config(url), "0002")
    with engine.connect() as connection:
        restored = connection.execute(sa.text("SELECT items FROM forget_requests")).scalar_one()
    assert restored == '[{"text": "an old clear-text record"}]'
    engine.dispose()
