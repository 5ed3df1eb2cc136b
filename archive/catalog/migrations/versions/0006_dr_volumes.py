"""DR volumes: volumes, their segments, which instance is in which segment, custody log

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "dr_volumes",
        sa.Column("id", BigId, nullable=False),
        sa.Column("barcode", sa.String(32), nullable=False),
        sa.Column("pool", sa.String(64), nullable=False),
        sa.Column("volume_set", sa.String(36), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("capacity", sa.BigInteger(), nullable=False),
        sa.Column("block_size", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("segments", sa.Integer(), nullable=False),
        sa.Column("studies", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("location", sa.String(128), nullable=False),
        sa.Column("device", sa.String(1024), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("recipients", sa.String(1024), nullable=False),
        sa.Column("continues", sa.Boolean(), nullable=False),
        sa.Column("writer", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sealed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retain_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stream_sha256", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("barcode", name="uq_dr_volume_barcode"),
    )
    op.create_index("ix_dr_volumes_pool_state", "dr_volumes", ["pool", "state"])
    op.create_table(
        "dr_segments",
        sa.Column("id", BigId, nullable=False),
        sa.Column("volume_fk", BigId, sa.ForeignKey("dr_volumes.id"), nullable=False),
        sa.Column("study_fk", BigId, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("member", sa.String(100), nullable=False),
        sa.Column("study_segment", sa.Integer(), nullable=False),
        sa.Column("last_of_study", sa.Boolean(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_dr_segments_volume", "dr_segments", ["volume_fk"])
    op.create_index("ix_dr_segments_study", "dr_segments", ["study_fk"])
    op.create_table(
        "dr_instances",
        sa.Column("id", BigId, nullable=False),
        sa.Column("instance_fk", BigId, sa.ForeignKey("instances.id"), nullable=False),
        sa.Column("segment_fk", BigId, sa.ForeignKey("dr_segments.id"), nullable=False),
        sa.Column("path", sa.String(300), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("parts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_dr_instances_instance", "dr_instances", ["instance_fk"])
    op.create_index("ix_dr_instances_segment", "dr_instances", ["segment_fk"])
    op.create_table(
        "dr_custody",
        sa.Column("id", BigId, nullable=False),
        sa.Column("volume_fk", BigId, sa.ForeignKey("dr_volumes.id"), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=False),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("location", sa.String(128), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("courier_ref", sa.String(128), nullable=False),
        sa.Column("note", sa.String(512), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_dr_custody_volume", "dr_custody", ["volume_fk"])


def downgrade() -> None:
    for ix, table in (("ix_dr_custody_volume", "dr_custody"),
                      ("ix_dr_instances_segment", "dr_instances"),
                      ("ix_dr_instances_instance", "dr_instances"),
                      ("ix_dr_segments_study", "dr_segments"),
                      ("ix_dr_segments_volume", "dr_segments"),
                      ("ix_dr_volumes_pool_state", "dr_volumes")):
        op.drop_index(ix, table_name=table)
    for table in ("dr_custody", "dr_instances", "dr_segments", "dr_volumes"):
        op.drop_table(table)
