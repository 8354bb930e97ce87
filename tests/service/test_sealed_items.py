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
from tests.service.rows import model_and_key


def local_keys(root):
    from app.core.config import Settings
    from app.core.key_store import key_store

    return key_store(Settings(data_dir=root))


def test_sealed_value_opens_only_with_its_epoch_key_and_context(tmp_path):
    from app.core.envelope import EnvelopeError, open_envelope, seal

    keys, context = local_keys(tmp_path / "a"), uuid.uuid4().bytes
    envelope = seal(b"Mira Solberg was born in Troms\xc3\xb8.", keys, context)
    assert envelope.key_epoch == 1
    assert open_envelope(envelope, keys, context) == "Mira Solberg was born in Tromsø.".encode()
    assert b"Mira" not in envelope.ciphertext + envelope.wrapped_key
    with pytest.raises(EnvelopeError):
        open_envelope(envelope, local_keys(tmp_path / "b"), context)  # another installation's epoch 1
    with pytest.raises(EnvelopeError):
        open_envelope(envelope, keys, uuid.uuid4().bytes)  # moved to another row


def test_tampered_ciphertext_does_not_open(tmp_path):
    from app.core.envelope import Envelope, EnvelopeError, open_envelope, seal

    keys = local_keys(tmp_path)
    envelope = seal(b"a record", keys, b"row")
    flipped = bytes([envelope.ciphertext[0] ^ 1]) + envelope.ciphertext[1:]
    with pytest.raises(EnvelopeError):
        open_envelope(Envelope(flipped, envelope.nonce, envelope.wrapped_key, envelope.key_epoch), keys, b"row")


def test_a_rewrapped_envelope_opens_under_the_new_epoch_only_while_the_old_key_is_gone(tmp_path):
    from app.core.envelope import EnvelopeError, open_envelope, rewrap, seal

    keys = local_keys(tmp_path)
    old = seal(b"a record", keys, b"row")
    assert keys.advance() == 2
    new = rewrap(old, keys, b"row")
    assert (new.key_epoch, new.ciphertext) == (2, old.ciphertext)
    keys.destroy(1)
    assert keys.epochs() == [2]
    assert open_envelope(new, keys, b"row") == b"a record"
    with pytest.raises(EnvelopeError, match="destroyed"):
        open_envelope(old, keys, b"row")


def test_unconfigured_keys_are_generated_once_with_owner_only_permissions(tmp_path):
    from app.core.certificate_key import SIGNING_KEY_FILE, key_id, signing_key
    from app.core.config import Settings

    settings = Settings(data_dir=tmp_path)
    first_signing, epoch = signing_key(settings), local_keys(tmp_path).current_epoch()
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    for name in (f"epoch-{epoch}.key", SIGNING_KEY_FILE):
        assert stat.S_IMODE((tmp_path / "keys" / name).stat().st_mode) == 0o600
    assert local_keys(tmp_path).current_epoch() == epoch
    assert key_id(signing_key(settings).public_key()) == key_id(first_signing.public_key())
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == sorted([f"epoch-{epoch}.key", SIGNING_KEY_FILE])


def test_a_key_folder_others_can_read_is_refused(tmp_path):
    from app.core.certificate_key import signing_key
    from app.core.config import Settings
    from app.core.key_files import KeyConfigurationError

    (tmp_path / "keys").mkdir(mode=0o755)
    (tmp_path / "keys").chmod(0o755)
    with pytest.raises(KeyConfigurationError, match="0700"):
        local_keys(tmp_path).current_epoch()
    with pytest.raises(KeyConfigurationError, match="0700"):
        signing_key(Settings(data_dir=tmp_path))


def test_configured_keys_are_used_and_malformed_ones_refused(tmp_path):
    from app.core.certificate_key import signing_key
    from app.core.config import Settings
    from app.core.key_files import KeyConfigurationError
    from app.core.key_store import legacy_master_key

    (tmp_path / "master").write_text(base64.b64encode(b"m" * 32).decode() + "\n")
    assert legacy_master_key(Settings(data_dir=tmp_path, master_key_file=tmp_path / "master")) == b"m" * 32
    assert not (tmp_path / "keys").exists()
    with pytest.raises(KeyConfigurationError, match="32 bytes"):
        legacy_master_key(Settings(data_dir=tmp_path, master_key=base64.b64encode(b"short").decode()))
    with pytest.raises(KeyConfigurationError, match="PEM"):
        signing_key(Settings(data_dir=tmp_path, signing_key="not a key"))
    with pytest.raises(KeyConfigurationError, match="cannot read"):
        signing_key(Settings(data_dir=tmp_path, signing_key_file=tmp_path / "missing.pem"))


def test_submitted_items_are_stored_only_encrypted(client, writer_key, registered_model, settings):
    from app.core.db import get_engine
    from app.forget_requests.items import item_digest, open_items
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
        assert request.item_sha256s == [item_digest(item, settings) for item in items]
        assert open_items(request, settings) == items


def test_migration_seals_existing_clear_text_items_and_downgrade_restores_them(tmp_path, settings):
    from app.core.db import make_engine
    from app.forget_requests.items import item_digest, open_items
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
        assert request.item_sha256s == [item_digest(items[0], settings)]  # 0006 keyed the plain sha256
        assert open_items(request, settings) == items
    assert "items" not in {column["name"] for column in sa.inspect(engine).get_columns("forget_requests")}

    command.downgrade(alembic_config(url), "0002")
    with engine.connect() as connection:
        restored = connection.execute(sa.text("SELECT items FROM forget_requests")).scalar_one()
    assert restored == '[{"text": "an old clear-text record"}]'
    engine.dispose()


def test_the_first_epoch_advance_rewraps_master_key_rows_and_destroys_the_master_key(tmp_path):
    """Rows sealed before key epochs (epoch 0, the master key) keep opening, and are re-wrapped by an advance."""
    from app.core.config import Settings
    from app.core.db import make_engine, utcnow
    from app.core.envelope import Envelope, EnvelopeError, open_envelope, seal
    from app.core.key_files import private_folder
    from app.core.key_store import LEGACY_EPOCH, LocalKeyStore, aes_wrap, legacy_master_key
    from app.forget_requests.items import open_items
    from app.forget_requests.models import ForgetRequest
    from app.migrate import upgrade
    from app.retention.epochs import advance_key_epoch

    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'unlearnd.sqlite'}")
    upgrade(settings.database_url)
    master = b"m" * 32
    private_folder(settings.keys_dir)
    (settings.keys_dir / "master.key").write_bytes(base64.b64encode(master))
    engine = make_engine(settings.database_url)
    request_id, items = uuid.uuid4(), [{"text": "sealed before epochs"}]

    class MasterKeyOnly(LocalKeyStore):  # how requests were sealed before key epochs
        def wrap(self, data_key: bytes, context: bytes) -> tuple[int, bytes]:
            return LEGACY_EPOCH, aes_wrap(master, data_key, context)

    sealed = seal(b'[{"text":"sealed before epochs"}]', MasterKeyOnly(settings), request_id.bytes)
    with Session(engine) as session:
        key, model = model_and_key(session)
        session.add(
            ForgetRequest(id=request_id, api_key_id=key.id, subject_request_id="old", base_model_id=model.id,
                          item_sha256s=["h"], items_ciphertext=sealed.ciphertext, items_nonce=sealed.nonce,
                          wrapped_key=sealed.wrapped_key, key_epoch=sealed.key_epoch, body_sha256="b",
                          due_at=utcnow())
        )  # fmt: skip
        session.commit()
        assert open_items(session.get(ForgetRequest, request_id), settings) == items
        assert advance_key_epoch(session, settings) == 2
        request = session.get(ForgetRequest, request_id)
        assert request.key_epoch == 2 and open_items(request, settings) == items
    assert legacy_master_key(settings) is None and not (settings.keys_dir / "master.key").exists()
    with pytest.raises(EnvelopeError):
        open_envelope(
            Envelope(sealed.ciphertext, sealed.nonce, sealed.wrapped_key, 0), LocalKeyStore(settings), request_id.bytes
        )
    engine.dispose()


def test_stored_item_digests_confirm_no_guessed_record_without_the_digest_key(client, writer_key, registered_model):
    """A plain sha256 of a short item (a phone number) is confirmed by hashing candidates; a keyed digest is not."""
    import hashlib
    import hmac
    import json

    from app.core.config import Settings, get_settings
    from app.core.db import get_engine
    from app.core.digest_key import item_digest_key
    from app.forget_requests.models import ForgetRequest

    item = {"text": "+47 912 34 567"}
    body = {"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": registered_model, "items": [item]}
    response = client.post("/v1/forget-requests", headers=auth(writer_key), json=body)
    assert response.status_code == 201, response.text
    with Session(get_engine()) as session:
        (stored,) = session.get(ForgetRequest, uuid.UUID(response.json()["id"])).item_sha256s
    plain = hashlib.sha256(json.dumps(item, sort_keys=True, separators=(",", ":")).encode())
    assert stored != plain.hexdigest()  # hashing the guessed record does not find it
    assert stored == hmac.new(item_digest_key(get_settings()), plain.digest(), hashlib.sha256).hexdigest()
    assert item_digest_key(get_settings()) != item_digest_key(Settings(data_dir=get_settings().data_dir / "other"))


def test_the_sqlite_database_its_wal_and_the_artifact_store_are_owner_only(tmp_path):
    from app.adapters.store import LocalArtifactStore
    from app.core.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'unlearnd.sqlite'}")
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        connection.execute(sa.text("INSERT INTO t VALUES (1)"))
        for suffix in ("", "-wal", "-shm"):
            path = tmp_path / "var" / f"unlearnd.sqlite{suffix}"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, suffix
    engine.dispose()
    assert stat.S_IMODE((tmp_path / "var").stat().st_mode) == 0o700
    store = LocalArtifactStore(tmp_path / "artifacts")
    (tmp_path / "checkpoint.bin").write_bytes(b"state")
    store.scratch_put("job-1/checkpoint.bin", tmp_path / "checkpoint.bin")
    assert stat.S_IMODE((tmp_path / "artifacts").stat().st_mode) == 0o700


def test_a_locked_sqlite_database_answers_within_the_busy_timeout(tmp_path):
    import time

    from sqlalchemy.exc import OperationalError

    from app.core.config import Settings
    from app.core.db import make_engine

    assert Settings().sqlite_busy_timeout_seconds <= 5
    url = f"sqlite:///{tmp_path / 'locked.sqlite'}"
    holder, waiter = make_engine(url), make_engine(url, sqlite_busy_timeout=0.5)
    with holder.connect() as locked:
        locked.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        locked.exec_driver_sql("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(OperationalError, match="locked"), waiter.begin() as connection:
            connection.exec_driver_sql("INSERT INTO t VALUES (1)")
        assert time.monotonic() - started < 3
        locked.exec_driver_sql("ROLLBACK")
    holder.dispose()
    waiter.dispose()
