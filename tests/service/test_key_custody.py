"""Key custody: a copy of the database taken before a shred cannot be decrypted after it, with every key the
service still holds, on the local key store and on AWS KMS (moto's server)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.service.processes import start_moto, stop
from tests.service.rows import model_and_key

TEXTS = {"shredded": "Ola Nordmann's phone is +47 912 34 567.", "live": "Kari Nordmann lives at 7 Fjord Road."}


@pytest.fixture(scope="module")
def kms_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    yield endpoint
    stop(server, timeout=5)


def kms_settings(endpoint: str) -> dict:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    return {
        "key_store": "kms",
        "kms_endpoint_url": endpoint,
        "kms_access_key_id": "testing",
        "kms_secret_access_key": "testing",
        "kms_alias_prefix": prefix,
    }


@dataclass
class Shredded:
    """A deployment after the retention pass shredded one of two requests, and a copy of its database from before."""

    settings: object
    live: Engine
    copy: Engine
    ids: dict[str, uuid.UUID]
    database: Path


def shred_after_copying(root: Path, **key_settings: object) -> Shredded:
    from app.core.config import Settings
    from app.core.db import make_engine
    from app.forget_requests.models import ForgetRequest, RequestStatus
    from app.forget_requests.schemas import ForgetRequestCreate
    from app.forget_requests.service import submit
    from app.migrate import upgrade
    from app.retention.service import shred_due

    database = root / "var" / "unlearnd.sqlite"
    settings = Settings(
        data_dir=root / "var",
        database_url=f"sqlite:///{database}",
        retention_days=0,
        retention_versions=0,
        **key_settings,
    )
    upgrade(settings.database_url)
    live = make_engine(settings.database_url)
    with Session(live, expire_on_commit=False) as session:
        key, _ = model_and_key(session)
        ids = {}
        for name, text in TEXTS.items():
            body = ForgetRequestCreate(subject_request_id=name, model="m", items=[{"text": text}])
            ids[name] = submit(session, key, body, settings)[0].id
        session.get(ForgetRequest, ids["shredded"]).status = RequestStatus.cancelled
        session.commit()

        (root / "copy").mkdir()
        for path in database.parent.glob(database.name + "*"):  # the file, its WAL and its shared memory
            shutil.copy2(path, root / "copy" / path.name)
        assert shred_due(session, settings, actor="test") == [ids["shredded"]]
    return Shredded(settings, live, make_engine(f"sqlite:///{root / 'copy' / database.name}"), ids, database)


def assert_copy_is_useless(shredded: Shredded) -> None:
    from app.core.envelope import EnvelopeError
    from app.forget_requests.items import open_items
    from app.forget_requests.models import ForgetRequest

    with Session(shredded.copy) as session:
        for name in TEXTS:
            request = session.get(ForgetRequest, shredded.ids[name])
            assert request.wrapped_key is not None  # the copy still has the wrapped data keys...
            with pytest.raises(EnvelopeError):
                open_items(request, shredded.settings)  # ...but no key the service holds unwraps them
    with Session(shredded.live) as session:
        live = session.get(ForgetRequest, shredded.ids["live"])
        assert open_items(live, shredded.settings) == [{"text": TEXTS["live"]}]  # the live request still opens
        assert session.get(ForgetRequest, shredded.ids["shredded"]).wrapped_key is None


def test_a_database_copy_from_before_a_shred_does_not_open_after_it(tmp_path):
    shredded = shred_after_copying(tmp_path)
    assert_copy_is_useless(shredded)
    from app.core.key_store import key_store

    keys = sorted(p.name for p in shredded.settings.keys_dir.glob("epoch-*.key"))
    assert keys == [f"epoch-{key_store(shredded.settings).current_epoch()}.key"]  # the older epoch keys are gone


def test_a_database_copy_from_before_a_shred_does_not_open_after_it_with_kms(tmp_path, kms_endpoint):
    import boto3

    shredded = shred_after_copying(tmp_path, **kms_settings(kms_endpoint))
    assert_copy_is_useless(shredded)
    from app.core.key_store import key_store

    kms = boto3.client("kms", endpoint_url=kms_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                       aws_secret_access_key="testing")  # fmt: skip
    prefix = f"alias/{shredded.settings.kms_alias_prefix}-"
    aliases = {
        a["TargetKeyId"]: a["AliasName"] for a in kms.list_aliases()["Aliases"] if a["AliasName"].startswith(prefix)
    }
    assert list(aliases.values()) == [f"{prefix}epoch-{key_store(shredded.settings).current_epoch()}"]
    states = [kms.describe_key(KeyId=k["KeyId"])["KeyMetadata"] for k in kms.list_keys()["Keys"]]
    retired = [m for m in states if m["KeyId"] not in aliases and prefix in m.get("Description", "")]
    assert retired and all(m["KeyState"] == "PendingDeletion" and not m["Enabled"] for m in retired)


def test_a_shred_leaves_neither_the_wrapped_key_nor_the_ciphertext_in_the_sqlite_files(tmp_path):
    from app.forget_requests.models import ForgetRequest

    shredded = shred_after_copying(tmp_path)
    with Session(shredded.copy) as session:
        before = session.get(ForgetRequest, shredded.ids["shredded"])
        values = [before.wrapped_key, before.items_ciphertext]
    on_disk = b"".join(p.read_bytes() for p in shredded.database.parent.glob(shredded.database.name + "*"))
    for value in values:
        assert value not in on_disk


def test_an_advance_cut_short_is_finished_by_the_next_retention_pass(tmp_path):
    from app.core.key_store import key_store
    from app.retention.service import shred_due

    shredded = shred_after_copying(tmp_path)
    keys = key_store(shredded.settings)
    keys.advance()  # as if the process died right after creating the next epoch
    assert len(keys.epochs()) == 2
    with Session(shredded.live) as session:
        assert shred_due(session, shredded.settings, actor="test") == []  # nothing new to shred...
    assert keys.epochs() == [keys.current_epoch()]  # ...but the older key is destroyed all the same
    assert_copy_is_useless(shredded)


def test_a_postgres_backup_from_before_an_admin_shred_does_not_open_after_it(
    client, writer_key, admin_key, registered_model, settings
):
    """The rows as a backup (or PostgreSQL's dead tuples) keep them, taken before the admin's shred on PostgreSQL."""
    from app.core.db import session_scope
    from app.core.envelope import Envelope, EnvelopeError, open_envelope
    from app.core.key_store import key_store
    from app.forget_requests.items import open_items
    from app.forget_requests.models import ForgetRequest
    from tests.service.conftest import auth

    ids = []
    for text in TEXTS.values():
        body = {"subject_request_id": uuid.uuid4().hex, "model": registered_model, "items": [{"text": text}]}
        ids.append(client.post("/v1/forget-requests", headers=auth(writer_key), json=body).json()["id"])
    assert client.delete(f"/v1/forget-requests/{ids[0]}", headers=auth(writer_key)).status_code == 202
    with session_scope() as session:
        backup = {}
        for request_id in ids:
            row = session.get(ForgetRequest, uuid.UUID(request_id))
            backup[request_id] = Envelope(row.items_ciphertext, row.items_nonce, row.wrapped_key, row.key_epoch)
    assert client.post(f"/v1/forget-requests/{ids[0]}/shred", headers=auth(admin_key)).status_code == 200
    for request_id, envelope in backup.items():
        with pytest.raises(EnvelopeError):
            open_envelope(envelope, key_store(settings), uuid.UUID(request_id).bytes)
    with session_scope() as session:
        assert open_items(session.get(ForgetRequest, uuid.UUID(ids[1])), settings) == [{"text": TEXTS["live"]}]
