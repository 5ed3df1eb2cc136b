"""atna cursors: how far the audit trail has gone to each ATNA collector

Revision ID: 0013
Revises: 0012

ATNA messages are sent from the audit trail itself, in its order, by whichever
process holds the collector's lease; the position of the last record a collector
took is kept here, so a restart or a collector outage loses nothing and sends
nothing twice.
"""
import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "atna_cursors",
        sa.Column("collector", sa.String(300), primary_key=True),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("atna_cursors")
