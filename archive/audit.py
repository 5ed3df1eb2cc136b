"""The audit trail: who touched which patient's data, and the system's protection.

Every event is a row of ``audit_log``, appended under a lock on the one-row
``audit_head`` so that records chain in order across processes and daemons
sharing a catalog. Each record carries the SHA-256 of the previous record and
its own hash over a canonical form of all its fields, so editing, deleting or
reordering any record, or cutting the log short, is found by ``verify`` (with
the position of the first bad record). Checkpoints (the chain's hash at a
record) are MAC'd with a key kept outside the database and sent with every
audit message to the collector, an anchor a database administrator cannot
rewrite.

Audit records hold patient IDs and study UIDs: that is their purpose. They
stay in the catalog (and go to the audit collector); the application log never
carries them.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import select

from archive.catalog.models import AuditCheckpoint, AuditHead, AuditRecord
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow

log = logging.getLogger("pacsvault.audit")

GENESIS = "0" * 64
CHECKPOINT_EVERY = 1000
ACTIONS = (
    "object-received", "query", "retrieve", "restore", "export", "recall", "migration",
    "scrub-finding", "dr-volume-written", "dr-volume-moved", "drill", "login", "login-failed",
    "logout", "user-change", "peer-change", "config-change", "key-use", "audit-read",
)
# Something else that wants every record (the ATNA sender): set by the daemon/CLI.
_listeners: list[Callable[["Event", int, str], None]] = []
_key_file: Path | None = None          # the checkpoint MAC key (see configure)


def key_path(data_dir: Path) -> Path:
    return data_dir / "secrets" / "audit.key"


def configure(data_dir: Path) -> None:
    """Use (and create) this install's checkpoint key for the records this process writes."""
    global _key_file
    path = key_path(data_dir)
    try:
        ensure_key(path)
        _key_file = path
    except OSError as e:
        log.warning("audit checkpoint key unavailable (%s): checkpoints are not signed", e.strerror)


@dataclass
class Event:
    action: str
    outcome: str = "success"            # success | failure
    actor: str = "system"               # an operator's name, or a process ("pacsvault serve")
    source: str = ""                    # host, or AE title@address for DICOM peers
    patient_id: str | None = None
    study_uid: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def add_listener(fn: Callable[[Event, int, str], None]) -> None:
    _listeners.append(fn)


def remove_listener(fn: Callable[[Event, int, str], None]) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def host() -> str:
    return socket.gethostname()[:64]


def _ts(t: datetime) -> str:
    if t.tzinfo is None:                 # SQLite gives naive UTC back
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def chain_hash(rec_id: int, at: datetime, actor: str, action: str, outcome: str, source: str,
               patient_id: str | None, study_uid: str | None, detail: str, prev: str) -> str:
    canon = json.dumps([rec_id, _ts(at), actor, action, outcome, source, patient_id, study_uid,
                        detail, prev], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def record(catalog: Catalog, ev: Event, *, clock: Clock = utcnow,
           key_file: Path | None = None) -> int:
    """Append one event; returns its position (id)."""
    key_file = key_file or _key_file
    if ev.action not in ACTIONS:
        raise ValueError(f"unknown audit action {ev.action!r}")
    detail = json.dumps(ev.detail, sort_keys=True, separators=(",", ":"), default=str)
    at = clock()
    with catalog.unit(write=True) as uow:
        s = uow.session
        head = s.execute(select(AuditHead).where(AuditHead.id == 1).with_for_update()).scalar_one()
        rec_id = head.last_id + 1
        h = chain_hash(rec_id, at, ev.actor[:128], ev.action, ev.outcome, ev.source[:128],
                       ev.patient_id, ev.study_uid, detail, head.last_hash)
        s.add(AuditRecord(id=rec_id, at=at, actor=ev.actor[:128], action=ev.action,
                          outcome=ev.outcome, source=ev.source[:128], patient_id=ev.patient_id,
                          study_uid=ev.study_uid, detail=detail, prev_hash=head.last_hash, hash=h))
        head.last_id, head.last_hash = rec_id, h
        if key_file is not None and rec_id % CHECKPOINT_EVERY == 0:
            s.add(AuditCheckpoint(upto_id=rec_id, hash=h, at=at, mac=_mac(key_file, rec_id, h)))
        uow.commit()
    for fn in list(_listeners):
        try:
            fn(ev, rec_id, h)
        except Exception:                 # an unreachable collector never stops the work
            log.exception("audit listener failed")
    return rec_id


def record_quietly(catalog: Catalog, ev: Event, **kw: Any) -> None:
    """For paths that must not fail because auditing failed (it is logged loudly)."""
    try:
        record(catalog, ev, **kw)
    except Exception:
        log.exception("could not write an audit record (action %s)", ev.action)


# -- the checkpoint key ------------------------------------------------------------------
def ensure_key(path: Path) -> None:
    """Create the checkpoint MAC key (32 random bytes, mode 0600) if absent."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


def _mac(key_file: Path, upto: int, h: str) -> str:
    key = bytes.fromhex(key_file.read_text().strip())
    return hmac.new(key, f"{upto}:{h}".encode(), hashlib.sha256).hexdigest()


def checkpoint(catalog: Catalog, key_file: Path, clock: Clock = utcnow) -> dict[str, Any]:
    """A checkpoint at the chain's end now (also made every 1000 records)."""
    with catalog.unit(write=True) as uow:
        head = uow.session.execute(select(AuditHead).where(AuditHead.id == 1)
                                   .with_for_update()).scalar_one()
        cp = AuditCheckpoint(upto_id=head.last_id, hash=head.last_hash, at=clock(),
                             mac=_mac(key_file, head.last_id, head.last_hash))
        uow.session.add(cp)
        uow.commit()
        return {"upto_id": cp.upto_id, "hash": cp.hash, "mac": cp.mac}


# -- verification ----------------------------------------------------------------------------
def verify(catalog: Catalog, key_file: Path | None = None,
           anchor: tuple[int, str] | None = None) -> dict[str, Any]:
    """Walk the chain. The first bad record (its position and why), or ok."""
    bad: dict[str, Any] | None = None
    n = 0
    prev = GENESIS
    hashes: dict[int, str] = {}
    with catalog.unit() as uow:
        s = uow.session
        expect = 1
        for r in s.execute(select(AuditRecord).order_by(AuditRecord.id)).scalars():
            n += 1
            if r.id != expect:
                bad = {"position": expect, "why": f"record {expect} is missing (deleted)"}
                break
            if r.prev_hash != prev:
                bad = {"position": r.id, "why": "does not follow the record before it "
                                                "(a record before it was changed, removed or moved)"}
                break
            h = chain_hash(r.id, r.at, r.actor, r.action, r.outcome, r.source, r.patient_id,
                           r.study_uid, r.detail, r.prev_hash)
            if h != r.hash:
                bad = {"position": r.id, "why": "its content was changed after it was written"}
                break
            hashes[r.id] = h
            prev = h
            expect += 1
        head = s.get(AuditHead, 1)
        if bad is None and head is not None and (head.last_id != expect - 1 or head.last_hash != prev):
            bad = {"position": expect, "why": f"the log ends at record {expect - 1} but record "
                                              f"{head.last_id} was written (records cut off)"}
        cps = [(c.id, c.upto_id, c.hash, c.mac)
               for c in s.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id))]
    checkpoints_ok = 0
    if bad is None:
        for cp_id, upto, cp_hash, mac in cps:
            if hashes.get(upto) != cp_hash:
                bad = {"position": upto, "why": f"differs from checkpoint {cp_id}"}
                break
            if key_file is not None and key_file.exists() and \
                    not hmac.compare_digest(_mac(key_file, upto, cp_hash), mac):
                bad = {"position": upto, "why": f"checkpoint {cp_id} is not signed by our key"}
                break
            checkpoints_ok += 1
    if bad is None and anchor is not None:
        at, h = anchor
        if hashes.get(at) != h:
            bad = {"position": at, "why": "differs from the anchor given (kept outside the catalog)"}
    return {"ok": bad is None, "records": n, "checkpoints": checkpoints_ok,
            "head": {"id": expect - 1, "hash": prev}, "first_bad": bad}


def query(catalog: Catalog, *, patient_id: str | None = None, study_uid: str | None = None,
          actor: str | None = None, since: datetime | None = None, until: datetime | None = None,
          limit: int = 10_000) -> list[dict[str, Any]]:
    q = select(AuditRecord).order_by(AuditRecord.id)
    if patient_id:
        q = q.where(AuditRecord.patient_id == patient_id)
    if study_uid:
        q = q.where(AuditRecord.study_uid == study_uid)
    if actor:
        q = q.where(AuditRecord.actor == actor)
    if since:
        q = q.where(AuditRecord.at >= since)
    if until:
        q = q.where(AuditRecord.at <= until)
    with catalog.unit() as uow:
        return [{"id": r.id, "at": _ts(r.at), "actor": r.actor, "action": r.action,
                 "outcome": r.outcome, "source": r.source, "patient_id": r.patient_id,
                 "study_uid": r.study_uid, "detail": json.loads(r.detail or "{}")}
                for r in uow.session.scalars(q.limit(limit))]


def record_studies(catalog: Catalog, action: str, actor: str, per_study: dict[str, dict[str, Any]],
                   *, outcome_of: Callable[[dict[str, Any]], str] = lambda d: "success",
                   source: str | None = None) -> None:
    """One record per study (with its Patient ID from the catalog): who touched
    which patient's data, in one place. ``per_study``: study UID -> detail."""
    from archive.catalog.models import Patient, Study

    if not per_study:
        return
    with catalog.unit() as uow:
        pids = dict(uow.session.execute(
            select(Study.study_uid, Patient.patient_id).join(Patient, Patient.id == Study.patient_fk)
            .where(Study.study_uid.in_(list(per_study)))).all())
    for uid, detail in per_study.items():
        record_quietly(catalog, Event(action, outcome_of(detail), actor, source or host(),
                                      pids.get(uid), uid, detail))


def record_key_use(catalog: Catalog, actor: str, identities: list, purpose: str) -> None:
    """A DR identity was used (by fingerprint; never the key itself)."""
    from dr.keys import identity_fingerprints

    if identities:
        record_quietly(catalog, Event("key-use", actor=actor, source=host(),
                                      detail={"purpose": purpose,
                                              "fingerprints": sorted(identity_fingerprints(identities))}))
