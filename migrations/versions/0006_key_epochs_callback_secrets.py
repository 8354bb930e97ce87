"""key epochs, per-tenant callback secrets, keyed item digests

Each request's wrapped data key records the key store epoch that wraps it. Existing rows were wrapped by the master
key, which is epoch 0: the first epoch advance re-wraps them and destroys it. callback_secrets holds each tenant's
callback secret generation (the secret itself is derived, never stored); no tenant has one until it creates it.
The items' plain sha256s become keyed digests, HMAC-SHA256(item digest key, sha256), so that they confirm no guessed
text without the key (downgrading keeps the keyed digests: a plain hash cannot be recovered from them). Reading or
generating the item digest key is frozen here as it was when this migration was written.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 17:00:00.000000
"""

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.core.config import get_settings
from app.core.db import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


requests = sa.table("forget_requests", sa.column("id", sa.Uuid()), sa.column("item_sha256s", sa.JSON()))


def item_digest_key() -> bytes:
    """The configured item digest key (a value or a file), else the one generated under data_dir/keys (mode 0600)."""
    settings = get_settings()
    if settings.item_digest_key is not None:
        raw = settings.item_digest_key.get_secret_value().encode()
    elif settings.item_digest_key_file is not None:
        raw = settings.item_digest_key_file.read_bytes()
    else:
        path = settings.keys_dir / "item-digest.key"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(base64.b64encode(secrets.token_bytes(32)))
        raw = path.read_bytes()
    key = base64.b64decode(raw.strip(), validate=True)
    if len(key) != 32:
        raise ValueError(f"the item digest key must be 32 bytes, got {len(key)}")
    return key


def upgrade() -> None:
    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key_epoch", sa.Integer(), server_default="0", nullable=False))
    connection = op.get_bind()
    rows = connection.execute(sa.select(requests.c.id, requests.c.item_sha256s)).all()
    key = item_digest_key() if rows else b""
    for request_id, hashes in rows:
        digests = [hmac.new(key, bytes.fromhex(h), hashlib.sha256).hexdigest() for h in hashes]
        connection.execute(requests.update().where(requests.c.id == request_id).values(item_sha256s=digests))
    op.create_table(
        "callback_secrets",
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("rotated_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("previous_valid_until", UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("tenant"),
    )


def downgrade() -> None:
    op.drop_table("callback_secrets")
    # Rows wrapped by a later epoch no longer open with the master key alone: downgrade only before any advance.
    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.drop_column("key_epoch")
