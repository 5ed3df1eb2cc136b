"""query attributes: what C-FIND matches and returns that the catalog did not keep

Revision ID: 0010
Revises: 0009

Study ID and referring physician (studies), series description, date and time
(series), instance number (instances), and folded (case-insensitive) copies of
the two person names for matching them by prefix. The new columns are NULL on
rows already stored: archive/catalog/backfill_query.py fills them from the
objects (``pacsvault init`` runs it after this migration). Indexes serve the
queries that must stay fast at 10 million instances: patient name prefix and
ModalitiesInStudy (study date and accession were indexed in 0001).
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# Byte order on PostgreSQL, so LIKE 'PREFIX%' can use the index (as in models.py).
FOLDED = sa.String(324).with_variant(sa.String(324, collation="C"), "postgresql")


def upgrade() -> None:
    # Nullable columns without a default: a plain ADD COLUMN on both backends, no
    # table rebuild (SQLite) and no rewrite (PostgreSQL), whatever the catalog's size.
    op.add_column("patients", sa.Column("name_fold", FOLDED, nullable=True))
    op.add_column("studies", sa.Column("study_id", sa.String(16), nullable=True))
    op.add_column("studies", sa.Column("referring_physician", sa.String(324), nullable=True))
    op.add_column("studies", sa.Column("referring_physician_fold", FOLDED, nullable=True))
    op.add_column("series", sa.Column("series_description", sa.String(64), nullable=True))
    op.add_column("series", sa.Column("series_date", sa.String(8), nullable=True))
    op.add_column("series", sa.Column("series_time", sa.String(16), nullable=True))
    op.add_column("instances", sa.Column("instance_number", sa.String(12), nullable=True))
    op.create_index("ix_patients_name_fold", "patients", ["name_fold"])
    op.create_index("ix_series_modality_study", "series", ["modality", "study_fk"])


def downgrade() -> None:
    op.drop_index("ix_series_modality_study", table_name="series")
    op.drop_index("ix_patients_name_fold", table_name="patients")
    with op.batch_alter_table("instances") as b:
        b.drop_column("instance_number")
    with op.batch_alter_table("series") as b:
        b.drop_column("series_time")
        b.drop_column("series_date")
        b.drop_column("series_description")
    with op.batch_alter_table("studies") as b:
        b.drop_column("referring_physician_fold")
        b.drop_column("referring_physician")
        b.drop_column("study_id")
    with op.batch_alter_table("patients") as b:
        b.drop_column("name_fold")
