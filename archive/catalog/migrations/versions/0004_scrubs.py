"""scrub runs and findings

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "scrub_runs",
        sa.Column("id", BigId, nullable=False),
        sa.Column("sites", sa.String(512), nullable=False),
        sa.Column("sample", sa.Float(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cursor_site", sa.String(64), nullable=False),
        sa.Column("cursor_copy_id", sa.BigInteger(), nullable=False),
        sa.Column("objects", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("findings", sa.Integer(), nullable=False),
        sa.Column("repaired", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "scrub_findings",
        sa.Column("id", BigId, nullable=False),
        sa.Column("run_fk", BigId, sa.ForeignKey("scrub_runs.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("location", sa.String(64), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("instance_fk", BigId, sa.ForeignKey("instances.id"), nullable=True),
        sa.Column("repaired_from", sa.String(64), nullable=True),
        sa.Column("detail", sa.String(256), nullable=False),
        sa.Column("found_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_scrub_findings_run_fk", "scrub_findings", ["run_fk"])


def downgrade() -> None:
    op.drop_index("ix_scrub_findings_run_fk", table_name="scrub_findings")
    op.drop_table("scrub_findings")
    op.drop_table("scrub_runs")
