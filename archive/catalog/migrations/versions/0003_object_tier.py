"""object tier: study bundles, frame pointers on copies, leases, recall time

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "bundles",
        sa.Column("id", BigId, nullable=False),
        sa.Column("bundle_uuid", sa.String(36), nullable=False),
        sa.Column("study_fk", BigId, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("location", sa.String(64), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("server_checksum", sa.String(128), nullable=True),
        sa.Column("version_id", sa.String(1024), nullable=True),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retain_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("bundle_uuid"),
    )
    op.create_index("ix_bundles_study_fk", "bundles", ["study_fk"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    # Plain ADD COLUMN (no table rebuild, which would lose copies' partial indexes
    # on SQLite); SQLite accepts an inline REFERENCES on a nullable new column.
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE copies ADD COLUMN bundle_fk INTEGER REFERENCES bundles (id)")
    else:
        op.add_column("copies", sa.Column("bundle_fk", BigId, sa.ForeignKey("bundles.id"),
                                          nullable=True))
    op.add_column("copies", sa.Column("frame_offset", sa.BigInteger(), nullable=True))
    op.add_column("copies", sa.Column("frame_length", sa.BigInteger(), nullable=True))
    op.create_index("ix_copies_bundle_fk", "copies", ["bundle_fk"])
    op.add_column("studies", sa.Column("recalled_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("studies", "recalled_at")
    op.drop_index("ix_copies_bundle_fk", table_name="copies")
    for col in ("frame_length", "frame_offset", "bundle_fk"):
        op.drop_column("copies", col)
    op.drop_table("leases")
    op.drop_index("ix_bundles_study_fk", table_name="bundles")
    op.drop_table("bundles")
