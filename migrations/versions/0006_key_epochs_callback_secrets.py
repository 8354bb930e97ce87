"""key epochs, per-tenant callback secrets

Each request's wrapped data key records the key store epoch that wraps it. Existing rows were wrapped by the master
key, which is epoch 0: the first epoch advance re-wraps them and destroys it. callback_secrets holds each tenant's
callback secret generation (the secret itself is derived, never stored); no tenant has one until it creates it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 17:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.core.db import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key_epoch", sa.Integer(), server_default="0", nullable=False))
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
