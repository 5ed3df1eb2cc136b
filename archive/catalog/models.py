"""Catalog tables (SQLAlchemy 2 typed mappings).

Indexes follow the lookups that must stay fast at 10 million instances:
ingest (instance by SOP UID, study/series by UID), repair (copies by site and
state, oldest first), tiering and restore (instances by study), and C-FIND
(archive/catalog/query.py: patient name prefix, study date range, accession,
modality).

The query attributes added in 0010 are NULL until filled (at ingest, or by
archive/catalog/backfill_query.py for objects stored before): NULL means "not
read yet", an empty string "the object does not have it".
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# A folded person name (archive/dicom/pn.py), matched by prefix: byte order on
# PostgreSQL too (collation "C"), so LIKE 'PREFIX%' can use its index there as
# GLOB does on SQLite.
FoldedName = String(324).with_variant(String(324, collation="C"), "postgresql")


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))          # PHI: catalog only
    issuer: Mapped[str] = mapped_column(String(64), default="")
    name: Mapped[str] = mapped_column(String(324), default="")   # PHI: catalog only
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")
    name_fold: Mapped[str | None] = mapped_column(FoldedName)  # PHI: for matching
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patient"),
                      Index("ix_patients_name_fold", "name_fold"))


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession: Mapped[str] = mapped_column(String(16), default="", index=True)
    description: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_access_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    recalled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    study_id: Mapped[str | None] = mapped_column(String(16))
    referring_physician: Mapped[str | None] = mapped_column(String(324))     # PHI
    referring_physician_fold: Mapped[str | None] = mapped_column(FoldedName)


class Series(Base):
    """One series of one study. A Series Instance UID is meant to be unique, but
    broken modalities (and spoofed peers) reuse one across studies: each study
    then gets its own row, so an object stays filed under the study it was sent
    in, and every such row is flagged (uid_reused) like a conflict."""

    __tablename__ = "series"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[str] = mapped_column(String(12), default="")
    uid_reused: Mapped[bool] = mapped_column(Boolean, default=False)
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_date: Mapped[str | None] = mapped_column(String(8))
    series_time: Mapped[str | None] = mapped_column(String(16))
    __table_args__ = (UniqueConstraint("study_fk", "series_uid", name="uq_series_study"),
                      # ModalitiesInStudy: the studies holding a modality, from the index.
                      Index("ix_series_modality_study", "modality", "study_fk"))


class Instance(Base):
    """One received object. A SOP Instance UID received again with different
    bytes becomes a further version (conflict=True); nothing is overwritten."""

    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"))
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    sop_class: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    calling_ae: Mapped[str] = mapped_column(String(16))
    conflict: Mapped[bool] = mapped_column(Boolean, default=False)
    instance_number: Mapped[str | None] = mapped_column(String(12))
    __table_args__ = (
        UniqueConstraint("sop_uid", "version", name="uq_instance_version"),
        Index("ix_instances_study", "study_fk"),
        Index("ix_instances_series", "series_fk"),
        Index("ix_instances_received", "received_at"),
        # Conflicts are rare: a partial index makes counting them free.
        Index("ix_instances_conflict", "id", sqlite_where=text("conflict = 1"),
              postgresql_where=text("conflict")),
    )


class Copy(Base):
    """Where one copy of an instance lives.

    state: ok | missing (to be repaired) | corrupt | purging (an online copy being
    deleted after a verified migration) | purged (deleted; the row keeps its key
    so a recall puts the file back where it was). A copy on the object tier
    points at its study bundle and the instance's frame in it.
    """

    __tablename__ = "copies"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    instance_fk: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    location: Mapped[str] = mapped_column(String(64))     # site or tier name
    key: Mapped[str] = mapped_column(String(512))
    state: Mapped[str] = mapped_column(String(16))
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    bundle_fk: Mapped[int | None] = mapped_column(ForeignKey("bundles.id"), index=True)
    frame_offset: Mapped[int | None] = mapped_column(BigInteger)
    frame_length: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (
        UniqueConstraint("instance_fk", "location", name="uq_copy_location"),
        # under-replicated queue: WHERE location=? AND state='missing' ORDER BY id
        Index("ix_copies_location_state", "location", "state", "id"),
        # The repair queue and the oldest under-replicated object, without a full scan.
        Index("ix_copies_missing", "location", "id", sqlite_where=text("state = 'missing'"),
              postgresql_where=text("state = 'missing'")),
    )


class RestoreRequest(Base):
    """A study a retrieve (C-MOVE, C-GET, WADO-RS) needed while only DR volumes held
    some of it: queued to come back online once the volumes are loaded
    (`pacsvault restore --queued`, run by whoever holds the DR identity). One
    pending row per study; barcodes is a JSON list of the volumes named."""

    __tablename__ = "restore_requests"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    requested_by: Mapped[str] = mapped_column(String(128))      # AE title or account
    barcodes: Mapped[str] = mapped_column(Text, default="[]")
    state: Mapped[str] = mapped_column(String(16), default="pending")   # pending | done
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    __table_args__ = (Index("ix_restore_requests_state", "state", "study_fk"),)


class IngestInFlight(Base):
    """An instance whose row ingest committed while its copies were still being
    written (the two run at the same time): its copies are not confirmed until
    this row is gone. Ingest deletes it once they are; after a crash,
    replication/in_flight.py checks the sites and resolves what is left."""

    __tablename__ = "ingest_in_flight"
    instance_fk: Mapped[int] = mapped_column(ForeignKey("instances.id"), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Peer(Base):
    """A DICOM peer allowed to associate: AE title + source address (+ port)."""

    __tablename__ = "peers"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (UniqueConstraint("ae_title", "host", name="uq_peer"),)


class Bundle(Base):
    """One study bundle on the object tier (docs/formats/study-bundle.md).

    state: pending (upload started; on a re-run it is adopted if the stored
    object verifies, else abandoned) | ok | corrupt | abandoned.
    """

    __tablename__ = "bundles"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    bundle_uuid: Mapped[str] = mapped_column(String(36), unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    location: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    server_checksum: Mapped[str | None] = mapped_column(String(128))
    version_id: Mapped[str | None] = mapped_column(String(1024))
    instances: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retain_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Lease(Base):
    """A named lock with an expiry, held in the catalog so that two processes
    (or two daemons sharing one PostgreSQL catalog) never run the same job or
    touch the same study's tiering at once. A crashed holder's lease expires."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ScrubRun(Base):
    """One scrub: what it covered, how far it got (a restart resumes from the
    cursor), and what it found. state: running | done | interrupted."""

    __tablename__ = "scrub_runs"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sites: Mapped[str] = mapped_column(String(512))              # comma-separated names
    sample: Mapped[float] = mapped_column(Float, default=1.0)
    state: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cursor_site: Mapped[str] = mapped_column(String(64), default="")
    cursor_copy_id: Mapped[int] = mapped_column(BigInteger, default=0)
    objects: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    findings: Mapped[int] = mapped_column(Integer, default=0)
    repaired: Mapped[int] = mapped_column(Integer, default=0)


class ScrubFinding(Base):
    """Damage a scrub found. kind: missing | corrupt | orphan; repaired says
    whether a verified good copy replaced it (and from where)."""

    __tablename__ = "scrub_findings"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_fk: Mapped[int] = mapped_column(ForeignKey("scrub_runs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    location: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(512))
    instance_fk: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    repaired_from: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(String(256), default="")
    found_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class JobRun(Base):
    """One run of a job (migrate, scrub, ...), scheduled, caught up after
    downtime, or started by hand. outcome: running | ok | findings | failed |
    skipped (another holder had the lease) | interrupted (a crash left it
    running). summary: the run's counts as JSON; no patient data."""

    __tablename__ = "job_runs"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job: Mapped[str] = mapped_column(String(32))
    trigger: Mapped[str] = mapped_column(String(16))        # schedule | catch-up | manual
    host: Mapped[str] = mapped_column(String(128))
    scheduled_for: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str] = mapped_column(String(16))
    summary: Mapped[str] = mapped_column(String(2000), default="{}")
    __table_args__ = (Index("ix_job_runs_job_started", "job", "started_at"),)


class DrVolume(Base):
    """One DR volume (a tape, a file, an LTFS directory): docs/formats/dr-volume.md.

    state: writing | failed (a write that did not finish: its segments do not
    count) | sealed | in-library | in-transit | offsite | recalled | returned |
    expired | destroyed. Custody moves are logged in dr_custody.
    """

    __tablename__ = "dr_volumes"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    barcode: Mapped[str] = mapped_column(String(32), unique=True)
    pool: Mapped[str] = mapped_column(String(64))
    volume_set: Mapped[str] = mapped_column(String(36))
    sequence: Mapped[int] = mapped_column(Integer)
    capacity: Mapped[int] = mapped_column(BigInteger)
    block_size: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    segments: Mapped[int] = mapped_column(Integer, default=0)
    studies: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16))
    location: Mapped[str] = mapped_column(String(128), default="")
    device: Mapped[str] = mapped_column(String(1024), default="")    # where it was written
    kind: Mapped[str] = mapped_column(String(16))                    # stream | ltfs
    recipients: Mapped[str] = mapped_column(String(1024))            # JSON: fingerprints
    continues: Mapped[bool] = mapped_column(Boolean, default=False)  # the set goes on
    writer: Mapped[str] = mapped_column(String(128), default="")     # host:pid while writing
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sealed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retain_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    stream_sha256: Mapped[str | None] = mapped_column(String(64))
    __table_args__ = (Index("ix_dr_volumes_pool_state", "pool", "state"),)


class DrSegment(Base):
    """One encrypted member of a volume: part of one study's instances."""

    __tablename__ = "dr_segments"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    volume_fk: Mapped[int] = mapped_column(ForeignKey("dr_volumes.id"))
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    member: Mapped[str] = mapped_column(String(100))
    study_segment: Mapped[int] = mapped_column(Integer)      # 1, 2, ... within the study
    last_of_study: Mapped[bool] = mapped_column(Boolean)
    offset: Mapped[int] = mapped_column(BigInteger)          # of the member's header in the stream
    size: Mapped[int] = mapped_column(BigInteger)            # encrypted bytes
    sha256: Mapped[str] = mapped_column(String(64))          # of the encrypted bytes
    instances: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)           # instance bytes before compression
    __table_args__ = (Index("ix_dr_segments_volume", "volume_fk"),
                      Index("ix_dr_segments_study", "study_fk"))


class DrInstance(Base):
    """Instance (or one part of a large instance) inside a segment."""

    __tablename__ = "dr_instances"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    instance_fk: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    segment_fk: Mapped[int] = mapped_column(ForeignKey("dr_segments.id"))
    path: Mapped[str] = mapped_column(String(300))
    part: Mapped[int] = mapped_column(Integer, default=0)
    parts: Mapped[int] = mapped_column(Integer, default=1)
    __table_args__ = (Index("ix_dr_instances_instance", "instance_fk"),
                      Index("ix_dr_instances_segment", "segment_fk"))


class DrCustody(Base):
    """Append-only chain of custody: every move of a volume, who, where, when."""

    __tablename__ = "dr_custody"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    volume_fk: Mapped[int] = mapped_column(ForeignKey("dr_volumes.id"))
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    location: Mapped[str] = mapped_column(String(128), default="")
    actor: Mapped[str] = mapped_column(String(128), default="")
    courier_ref: Mapped[str] = mapped_column(String(128), default="")
    note: Mapped[str] = mapped_column(String(512), default="")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("ix_dr_custody_volume", "volume_fk"),)


class Drill(Base):
    """One restore drill: a reproducible random sample of studies per tier restored
    to scratch and checked. figures: per tier, studies, instances, bytes, time to
    first and last instance, MB/s (JSON). failures: what failed and why (JSON)."""

    __tablename__ = "drills"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    actor: Mapped[str] = mapped_column(String(128))
    trigger: Mapped[str] = mapped_column(String(16))          # manual | schedule
    tiers: Mapped[str] = mapped_column(String(64))            # comma-separated
    sample: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ok: Mapped[bool] = mapped_column(Boolean)
    figures: Mapped[str] = mapped_column(Text, default="{}")
    failures: Mapped[str] = mapped_column(Text, default="[]")
    __table_args__ = (Index("ix_drills_started", "started_at"),)


class User(Base):
    """An operator account (archive/auth). role: viewer | operator | key-custodian |
    auditor | admin. The password is an argon2id hash; must_change after an admin
    set it; locked_until after repeated failures."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    password_hash: Mapped[str] = mapped_column(String(256))
    must_change: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    password_set_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PasswordHistory(Base):
    __tablename__ = "password_history"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"))
    password_hash: Mapped[str] = mapped_column(String(256))
    set_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    __table_args__ = (Index("ix_password_history_user", "user_fk"),)


class LoginSession(Base):
    """A person's login (`pacsvault login`): only the token's SHA-256 is kept."""

    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    user_fk: Mapped[int] = mapped_column(ForeignKey("users.id"))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditRecord(Base):
    """One audit event (archive/audit). Append-only; ``hash`` chains each record
    to the one before it, so an edit, a deletion or a reordering shows."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(128))
    patient_id: Mapped[str | None] = mapped_column(String(64))       # PHI: catalog only
    study_uid: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="{}")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    __table_args__ = (Index("ix_audit_patient", "patient_id"), Index("ix_audit_study", "study_uid"),
                      Index("ix_audit_actor", "actor"), Index("ix_audit_at", "at"))


class AuditHead(Base):
    """The chain's end (one row): appenders lock it, so records chain in order."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger)
    last_hash: Mapped[str] = mapped_column(String(64))


class AtnaCursor(Base):
    """The last audit record a collector took (archive/atna_forwarder.py)."""

    __tablename__ = "atna_cursors"
    collector: Mapped[str] = mapped_column(String(300), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditCheckpoint(Base):
    """The chain's hash at a record, kept here, MAC'd with the audit key, and sent
    to the audit collector (an anchor outside this database)."""

    __tablename__ = "audit_checkpoints"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    upto_id: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    mac: Mapped[str] = mapped_column(String(64))
