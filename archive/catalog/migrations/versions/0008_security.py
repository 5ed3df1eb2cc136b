"""security: operator accounts, sessions, password history; the hash-chained audit log

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", BigId, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("must_change", sa.Boolean(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("password_set_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", name="uq_user_name"),
    )
    op.create_table(
        "password_history",
        sa.Column("id", BigId, nullable=False),
        sa.Column("user_fk", BigId, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("set_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_password_history_user", "password_history", ["user_fk"])
    op.create_table(
        "sessions",
        sa.Column("id", BigId, nullable=False),
        sa.Column("user_fk", BigId, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_sha256", name="uq_session_token"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", BigId, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("source", sa.String(128), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=True),
        sa.Column("study_uid", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_patient", "audit_log", ["patient_id"])
    op.create_index("ix_audit_study", "audit_log", ["study_uid"])
    op.create_index("ix_audit_actor", "audit_log", ["actor"])
    op.create_index("ix_audit_at", "audit_log", ["at"])
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # The chain starts at the genesis hash; appenders lock this row.
    op.bulk_insert(sa.table("audit_head", sa.column("id", sa.Integer()),
                            sa.column("last_id", sa.BigInteger()),
                            sa.column("last_hash", sa.String())),
                   [{"id": 1, "last_id": 0, "last_hash": "0" * 64}])
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", BigId, nullable=False),
        sa.Column("upto_id", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    for ix, table in (("ix_audit_at", "audit_log"), ("ix_audit_actor", "audit_log"),
                      ("ix_audit_study", "audit_log"), ("ix_audit_patient", "audit_log"),
                      ("ix_password_history_user", "password_history")):
        op.drop_index(ix, table_name=table)
    for table in ("audit_checkpoints", "audit_head", "audit_log", "sessions",
                  "password_history", "users"):
        op.drop_table(table)
