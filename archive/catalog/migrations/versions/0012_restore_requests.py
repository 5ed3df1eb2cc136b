"""restore requests: studies a retrieve needed from DR volumes, queued to come back online

Revision ID: 0012
Revises: 0011

A C-MOVE, C-GET or WADO-RS of instances that only DR volumes hold fails with the
barcodes to load; the study is queued here, and `pacsvault restore --queued`
brings every pending one back online once the volumes are readable.
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "restore_requests",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("study_fk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requested_by", sa.String(128), nullable=False),
        sa.Column("barcodes", sa.Text(), nullable=False, server_default="[]"),
        sa.Column("state", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_restore_requests_state", "restore_requests", ["state", "study_fk"])


def downgrade() -> None:
    op.drop_index("ix_restore_requests_state", "restore_requests")
    op.drop_table("restore_requests")
