"""request items sealed at rest

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-23 07:30:00.000000

Replaces the clear-text `forget_requests.items` with envelope-encrypted columns (a data key per request, wrapped by
the master key from the settings) and the items' sha256s in clear; existing rows are sealed on the way.
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.core.db
from app.core.canonical import canonical_json
from app.core.config import get_settings
from app.core.envelope import Envelope, open_envelope, seal
from app.core.keys import master_key
from app.forget_requests.items import item_sha256

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
        key = master_key(get_settings())
        for request_id, items in rows:
            envelope = seal(canonical_json(items), key, request_id.bytes)
            connection.execute(
                requests.update()
                .where(requests.c.id == request_id)
                .values(
                    item_sha256s=[item_sha256(item) for item in items],
                    items_ciphertext=envelope.ciphertext,
                    items_nonce=envelope.nonce,
                    wrapped_key=envelope.wrapped_key,
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
    key = master_key(get_settings()) if rows else b""
    for request_id, ciphertext, nonce, wrapped in rows:
        # A shredded request's texts are gone for good: it comes back with no items.
        sealed = Envelope(ciphertext, nonce, wrapped)
        items = [] if wrapped is None else json.loads(open_envelope(sealed, key, request_id.bytes))
        connection.execute(requests.update().where(requests.c.id == request_id).values(items=items))

    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.alter_column("items", existing_type=sa.JSON(), nullable=False)
        batch_op.drop_column("shredded_at")
        batch_op.drop_column("wrapped_key")
        batch_op.drop_column("items_nonce")
        batch_op.drop_column("items_ciphertext")
        batch_op.drop_column("item_sha256s")
