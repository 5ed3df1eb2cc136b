"""series per study: a Series Instance UID reused in another study gets its own row

Revision ID: 0009
Revises: 0008

Series UIDs were unique across the catalog, so an object whose series UID had
already arrived in another study was filed under that study's series row, and
every tool that loaded its own study's series (tiering, DR, restore, drill)
failed on it. Rows are now unique per (study, series UID), such rows are
flagged uid_reused, and instances misfiled that way move to a row of the study
they were sent in.
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# SQLite reflects the old inline UNIQUE without a name; batch mode names it by this.
NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}

series = sa.table("series", sa.column("id", sa.BigInteger), sa.column("series_uid", sa.String),
                  sa.column("study_fk", sa.BigInteger), sa.column("modality", sa.String),
                  sa.column("series_number", sa.String), sa.column("uid_reused", sa.Boolean))
instances = sa.table("instances", sa.column("id", sa.BigInteger),
                     sa.column("series_fk", sa.BigInteger), sa.column("study_fk", sa.BigInteger))


def _unique_on(bind, columns: list[str]) -> str | None:  # noqa: ANN001
    for uc in sa.inspect(bind).get_unique_constraints("series"):
        if uc["column_names"] == columns:
            return uc["name"] or "uq_series_" + "_".join(columns)
    return None


def upgrade() -> None:
    bind = op.get_bind()
    old = _unique_on(bind, ["series_uid"])
    with op.batch_alter_table("series", naming_convention=NAMING) as b:
        b.add_column(sa.Column("uid_reused", sa.Boolean(), nullable=False,
                               server_default=sa.false()))
        if old is not None:
            b.drop_constraint(old, type_="unique")
        b.create_unique_constraint("uq_series_study", ["study_fk", "series_uid"])
        b.create_index("ix_series_series_uid", ["series_uid"])
    _refile_misfiled(bind)
    bind.execute(series.update()
                 .where(series.c.series_uid.in_(
                     sa.select(series.c.series_uid).group_by(series.c.series_uid)
                     .having(sa.func.count() > 1)))
                 .values(uid_reused=True))


def _refile_misfiled(bind) -> None:  # noqa: ANN001
    """Instances whose series row belongs to another study get a row of their own study."""
    parent = series.alias("parent")
    misfiled = bind.execute(
        sa.select(instances.c.study_fk, instances.c.series_fk, parent.c.series_uid,
                  parent.c.modality, parent.c.series_number)
        .join(parent, parent.c.id == instances.c.series_fk)
        .where(parent.c.study_fk != instances.c.study_fk)
        .distinct()).all()
    for study_fk, series_fk, uid, modality, number in misfiled:
        found = bind.scalar(sa.select(series.c.id).where(series.c.study_fk == study_fk,
                                                         series.c.series_uid == uid))
        if found is None:
            bind.execute(series.insert().values(series_uid=uid, study_fk=study_fk,
                                                modality=modality, series_number=number,
                                                uid_reused=True))
            found = bind.scalar(sa.select(series.c.id).where(series.c.study_fk == study_fk,
                                                             series.c.series_uid == uid))
        bind.execute(instances.update()
                     .where(instances.c.study_fk == study_fk, instances.c.series_fk == series_fk)
                     .values(series_fk=found))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.scalar(sa.select(sa.func.count()).select_from(series)
                   .where(series.c.uid_reused == sa.true())):
        raise RuntimeError("series UIDs reused across studies are stored: "
                           "the old schema (one row per series UID) cannot hold them")
    with op.batch_alter_table("series", naming_convention=NAMING) as b:
        b.drop_index("ix_series_series_uid")
        b.drop_constraint("uq_series_study", type_="unique")
        b.create_unique_constraint("uq_series_series_uid", ["series_uid"])
        b.drop_column("uid_reused")
