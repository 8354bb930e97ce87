"""tenants, key expiry and status callbacks

API keys get a tenant and an expiry; requests get their key's tenant (existing rows: "default") and callback URLs;
subject_request_id becomes unique per tenant instead of per key; callback_deliveries holds every status change to
POST.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 07:20:19.006624
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.core.db

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tenant", sa.String(length=100), server_default="default", nullable=False))
        batch_op.add_column(sa.Column("expires_at", app.core.db.UTCDateTime(timezone=True), nullable=True))

    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tenant", sa.String(length=100), server_default="default", nullable=False))
        batch_op.add_column(sa.Column("status_callback_urls", sa.JSON(), server_default="[]", nullable=False))
        batch_op.drop_constraint("uq_forget_requests_key_subject", type_="unique")
        batch_op.create_unique_constraint("uq_forget_requests_tenant_subject", ["tenant", "subject_request_id"])
        batch_op.create_index("ix_forget_requests_tenant_received", ["tenant", "received_at", "id"], unique=False)

    op.create_table(
        "callback_deliveries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("url", sa.String(length=2100), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("occurred_at", app.core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", app.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", app.core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.ForeignKeyConstraint(["request_id"], ["forget_requests.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("callback_deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_callback_deliveries_due", ["delivered_at", "next_attempt_at"], unique=False)
        batch_op.create_index("ix_callback_deliveries_request_id", ["request_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("callback_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_callback_deliveries_request_id")
        batch_op.drop_index("ix_callback_deliveries_due")
    op.drop_table("callback_deliveries")

    with op.batch_alter_table("forget_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_forget_requests_tenant_received")
        batch_op.drop_constraint("uq_forget_requests_tenant_subject", type_="unique")
        batch_op.create_unique_constraint("uq_forget_requests_key_subject", ["api_key_id", "subject_request_id"])
        batch_op.drop_column("status_callback_urls")
        batch_op.drop_column("tenant")

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("expires_at")
        batch_op.drop_column("tenant")
