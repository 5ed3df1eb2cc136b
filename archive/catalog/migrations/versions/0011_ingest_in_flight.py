"""ingest in flight: instances whose copies were still being written at commit

Revision ID: 0011
Revises: 0010

Ingest now commits an instance's row while its copies are written, and answers
only when both are done. A row here marks an instance whose copies are not
confirmed yet; it is deleted once they are. A small table (one row per object
being received), so the recovery after a crash reads it whole.
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_in_flight",
        sa.Column("instance_fk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  sa.ForeignKey("instances.id"), primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ingest_in_flight")
