"""request items sealed at rest

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 07:30:00.000000

Replaces the clear-text `forget_requests.items` with envelope-encrypted columns (a data key per request, wrapped by
the master key from the settings) and the items' sha256s in clear; existing rows are sealed on the way. The sealing,
hashing and key reading are frozen here as they were when this migration was written, so that later changes to the
app's code cannot change what this migration does.
"""

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import app.core.db
from app.core.config import get_settings

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

requests = sa.table(
    "forget_requests",
    sa.column("id", sa.Uuid()),
    sa.column("items", sa.JSON()),
    sa.column("item_sha256s", sa.JSON()),
    sa.column("items_ciphertext", sa.LargeBinary()),
    sa.column("items_nonce", sa.LargeBinary()),
    sa.column("wrapped_key", sa.LargeBinary()),
)


NONCE_BYTES = 12


def canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def master_key() -> bytes:
    """The configured master key (a value or a file), else the one generated under data_dir/keys (mode 0600)."""
    settings = get_settings()
    if settings.master_key is not None:
        raw = settings.master_key.get_secret_value().encode()
    elif settings.master_key_file is not None:
        raw = settings.master_key_file.read_bytes()
    else:
        path = settings.keys_dir / "master.key"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(base64.b64encode(secrets.token_bytes(32)))
        raw = path.read_bytes()
    key = base64.b64decode(raw.strip(), validate=True)
    if len(key) != 32:
        raise ValueError(f"the master key must be 32 bytes, got {len(key)}")
    return key


def seal(plaintext: bytes, key: bytes, context: bytes) -> tuple[bytes, bytes, bytes]:
    """(ciphertext, nonce, wrapped data key): AES-256-GCM under a fresh data key, wrapped by the master key."""
    data_key = AESGCM.generate_key(bit_length=256)
    nonce, wrap_nonce = secrets.token_bytes(NONCE_BYTES), secrets.token_bytes(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, context)
    return ciphertext, nonce, wrap_nonce + AESGCM(key).encrypt(wrap_nonce, data_key, context)


def open_sealed(ciphertext: bytes, nonce: bytes, wrapped: bytes, key: bytes, context: bytes) -> bytes:
    data_key = AESGCM(key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], context)
    return AESGCM(data_key).decrypt(nonce, ciphertext, context)


def upgrade() -> None:
    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("item_sha256s", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("items_ciphertext", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("items_nonce", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("wrapped_key", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("shredded_at", app.core.db.UTCDateTime(timezone=True), nullable=True))

    connection = op.get_bind()
    rows = connection.execute(sa.select(requests.c.id, requests.c["items"])).all()
    if rows:
        key = master_key()
        for request_id, items in rows:
            ciphertext, nonce, wrapped = seal(canonical_json(items), key, request_id.bytes)
            connection.execute(
                requests.update()
                .where(requests.c.id == request_id)
                .values(
                    item_sha256s=[hashlib.sha256(canonical_json(item)).hexdigest() for item in items],
                    items_ciphertext=ciphertext,
                    items_nonce=nonce,
                    wrapped_key=wrapped,
                )
            )

    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.alter_column("item_sha256s", existing_type=sa.JSON(), nullable=False)
        batch_op.drop_column("items")


def downgrade() -> None:
    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("items", sa.JSON(), nullable=True))

    connection = op.get_bind()
    rows = connection.execute(
        sa.select(requests.c.id, requests.c.items_ciphertext, requests.c.items_nonce, requests.c.wrapped_key)
    ).all()
    key = master_key() if rows else b""
    for request_id, ciphertext, nonce, wrapped in rows:
        # A shredded request's texts are gone for good: it comes back with no items.
        items = [] if wrapped is None else json.loads(open_sealed(ciphertext, nonce, wrapped, key, request_id.bytes))
        connection.execute(requests.update().where(requests.c.id == request_id).values(items=items))

    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.alter_column("items", existing_type=sa.JSON(), nullable=False)
        batch_op.drop_column("shredded_at")
        batch_op.drop_column("wrapped_key")
        batch_op.drop_column("items_nonce")
        batch_op.drop_column("items_ciphertext")
        batch_op.drop_column("item_sha256s")
