"""partial indexes for status at 10 million instances

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_instances_conflict", "instances", ["id"],
                    sqlite_where=sa.text("conflict = 1"), postgresql_where=sa.text("conflict"))
    op.create_index("ix_copies_missing", "copies", ["location", "id"],
                    sqlite_where=sa.text("state = 'missing'"),
                    postgresql_where=sa.text("state = 'missing'"))


def downgrade() -> None:
    op.drop_index("ix_copies_missing", table_name="copies")
    op.drop_index("ix_instances_conflict", table_name="instances")
