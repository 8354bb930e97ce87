"""batching policy per model, job retry/cancel/enqueue bookkeeping

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 07:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.core.db import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("base_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("batching", sa.JSON(), nullable=False, server_default="{}"))
    with op.batch_alter_table("unlearning_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trigger", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("not_before", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("enqueued_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("cancel_requested_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("unlearning_jobs", schema=None) as batch_op:
        batch_op.drop_column("cancel_requested_at")
        batch_op.drop_column("enqueued_at")
        batch_op.drop_column("not_before")
        batch_op.drop_column("trigger")
    with op.batch_alter_table("base_models", schema=None) as batch_op:
        batch_op.drop_column("batching")
