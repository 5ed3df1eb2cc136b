"""The audit trail: who touched which patient's data, and the system's protection.

Every event is a row of ``audit_log``, appended under a lock on the one-row
``audit_head`` so that records chain in order across processes and daemons
sharing a catalog. Each record carries the link of the previous record and its
own link over a canonical form of all its fields, so editing, deleting or
reordering any record, or cutting the log short, is found by ``verify`` (with
the position of the first bad record).

A link is an HMAC-SHA-256 under the install's audit key, kept outside the
catalog (``<data_dir>/secrets/audit.key``): whoever can write the catalog but
not read that key cannot re-chain the records after one they changed. Records
an older version wrote carry the plain SHA-256 link; the position of the first
keyed record ("keyed-from N") is kept next to the key (``audit.chain``), so a
rewrite cannot pass keyed records off as old ones, and an old record cannot be
rewritten without re-chaining the first keyed one. Checkpoints (the chain's
link at a record, MAC'd with the same key) are also sent with every audit
message to the collector, an anchor outside this host.

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

from archive.catalog.models import (
    AuditCheckpoint,
    AuditHead,
    AuditRecord,
    Patient,
    Study,
)
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from archive.errors import PacsvaultError

log = logging.getLogger("pacsvault.audit")

GENESIS = "0" * 64
CHECKPOINT_EVERY = 1000
ACTIONS = (
    "object-received", "query", "retrieve", "restore", "export", "recall", "migration",
    "scrub-finding", "dr-volume-written", "dr-volume-moved", "drill", "login", "login-failed",
    "logout", "user-change", "peer-change", "config-change", "key-use", "audit-read",
    "catalog-backup", "catalog-restore",
)
KEYED = "pacsvault-audit-hmac-1"   # the keyed link's domain (never a checkpoint's MAC)
# Something else that wants every record (the ATNA sender): set by the daemon/CLI.
_listeners: list[Callable[["Event", int, str], None]] = []
_key_file: Path | None = None          # this install's audit key (see configure)


class AuditKeyMissing(PacsvaultError):
    """audit key unavailable: {}"""

    exit_code = 1


def key_path(data_dir: Path) -> Path:
    return data_dir / "secrets" / "audit.key"


def mark_path(key_file: Path) -> Path:
    """Where the position of the first keyed record is kept (next to the key)."""
    return key_file.with_name("audit.chain")


def configure(data_dir: Path) -> None:
    """Sign the records this process writes with this install's audit key. The key
    is made with the first record of an empty trail, never later: a key that went
    missing is reported (records are refused, verify fails), not replaced."""
    global _key_file
    _key_file = key_path(data_dir)
    if _key_file.parent.exists() and not _key_file.exists():
        log.error("the audit key %s is missing: audit records cannot be written or verified "
                  "until it is restored from the backup of %s", _key_file, _key_file.parent)


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


def keyed_hash(key: bytes, rec_id: int, at: datetime, actor: str, action: str, outcome: str,
               source: str, patient_id: str | None, study_uid: str | None, detail: str,
               prev: str) -> str:
    """The link of a record from keyed-from on: HMAC-SHA-256 under the audit key."""
    canon = json.dumps([KEYED, rec_id, _ts(at), actor, action, outcome, source, patient_id,
                        study_uid, detail, prev], separators=(",", ":"), ensure_ascii=False)
    return hmac.new(key, canon.encode(), hashlib.sha256).hexdigest()


def record(catalog: Catalog, ev: Event, *, clock: Clock = utcnow,
           key_file: Path | None = None) -> int:
    """Append one event; returns its position (id)."""
    key_file = key_file or _key_file
    if ev.action not in ACTIONS:
        raise ValueError(f"unknown audit action {ev.action!r}")
    if key_file is None:
        raise AuditKeyMissing("no audit key configured for this process")
    detail = json.dumps(ev.detail, sort_keys=True, separators=(",", ":"), default=str)
    at = clock()
    with catalog.unit(write=True) as uow:
        s = uow.session
        head = s.execute(select(AuditHead).where(AuditHead.id == 1).with_for_update()).scalar_one()
        rec_id = head.last_id + 1
        key = _signing_key(key_file, rec_id)
        h = keyed_hash(key, rec_id, at, ev.actor[:128], ev.action, ev.outcome, ev.source[:128],
                       ev.patient_id, ev.study_uid, detail, head.last_hash)
        s.add(AuditRecord(id=rec_id, at=at, actor=ev.actor[:128], action=ev.action,
                          outcome=ev.outcome, source=ev.source[:128], patient_id=ev.patient_id,
                          study_uid=ev.study_uid, detail=detail, prev_hash=head.last_hash, hash=h))
        head.last_id, head.last_hash = rec_id, h
        if rec_id % CHECKPOINT_EVERY == 0:
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


# -- the audit key and the keyed-from mark --------------------------------------------------
def ensure_key(path: Path) -> None:
    """Create the audit key (32 random bytes, mode 0600) if absent."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_new_secret(path, secrets.token_hex(32) + "\n")


def write_new_secret(path: Path, text: str) -> None:
    """A small secret file, created (never replaced), 0600, on disk before we go on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_key(key_file: Path) -> bytes:
    try:
        return bytes.fromhex(key_file.read_text().strip())
    except FileNotFoundError:
        raise AuditKeyMissing(f"the audit key {key_file} is missing: restore it from the "
                              f"backup of {key_file.parent}") from None
    except (OSError, ValueError) as e:
        raise AuditKeyMissing(f"the audit key {key_file} cannot be read "
                              f"({getattr(e, 'strerror', None) or 'not hex'})") from None


def keyed_from(key_file: Path) -> int | None:
    """The position of the first keyed record, or None (an older version's trail)."""
    try:
        word, n = mark_path(key_file).read_text().split()
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise AuditKeyMissing(f"{mark_path(key_file)} cannot be read") from None
    if word != "keyed-from" or not n.isdigit():
        raise AuditKeyMissing(f"{mark_path(key_file)} is not a keyed-from mark")
    return int(n)


def _signing_key(key_file: Path, rec_id: int) -> bytes:
    """The key for record ``rec_id`` (called under the head lock). The first record of
    an empty trail makes the key; the first one an upgraded install writes sets the
    keyed-from mark. A trail with records and no key refuses to go on."""
    if rec_id == 1 and not key_file.exists():
        ensure_key(key_file)
    key = _read_key(key_file)
    if keyed_from(key_file) is None:
        mark = mark_path(key_file)
        try:
            write_new_secret(mark, f"keyed-from {rec_id}\n")
        except FileExistsError:       # another process set it first: use theirs
            pass
        else:
            log.info("audit trail: records from %d on are keyed (%s)", rec_id, mark)
    return key


def _mac(key_file: Path, upto: int, h: str) -> str:
    key = _read_key(key_file)
    return hmac.new(key, f"{upto}:{h}".encode(), hashlib.sha256).hexdigest()


def checkpoint(catalog: Catalog, key_file: Path, clock: Clock = utcnow) -> dict[str, Any]:
    """A checkpoint at the chain's end now (also made every 1000 records)."""
    _read_key(key_file)                       # a missing key is said, not replaced
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
    """Walk the chain. The first bad record (its position and why), or ok. Without
    the audit key nothing can be vouched for: that is a failure, with the key's path."""
    key_file = key_file or _key_file
    try:
        if key_file is None:
            raise AuditKeyMissing("no audit key configured for this process")
        key, mark = _read_key(key_file), keyed_from(key_file)
    except AuditKeyMissing as e:
        return {"ok": False, "records": 0, "checkpoints": 0, "keyed_from": None,
                "head": None, "first_bad": {"position": None, "why": str(e)}}
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
            bad = _link_problem(r, key, mark, key_file)
            if bad is not None:
                break
            hashes[r.id] = prev = r.hash
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
            if not hmac.compare_digest(_mac(key_file, upto, cp_hash), mac):
                bad = {"position": upto, "why": f"checkpoint {cp_id} is not signed by our key"}
                break
            checkpoints_ok += 1
    if bad is None and anchor is not None:
        at, h = anchor
        if hashes.get(at) != h:
            bad = {"position": at, "why": "differs from the anchor given (kept outside the catalog)"}
    return {"ok": bad is None, "records": n, "checkpoints": checkpoints_ok, "keyed_from": mark,
            "head": {"id": expect - 1, "hash": prev}, "first_bad": bad}


def _link_problem(r: AuditRecord, key: bytes, mark: int | None,
                  key_file: Path) -> dict[str, Any] | None:
    """Why this record's own link is wrong, or None. From the keyed-from mark on the
    link must be the keyed one; before it (or with no mark yet) the plain SHA-256."""
    fields = (r.id, r.at, r.actor, r.action, r.outcome, r.source, r.patient_id, r.study_uid,
              r.detail, r.prev_hash)
    keyed = hmac.compare_digest(keyed_hash(key, *fields), r.hash)
    if mark is not None and r.id >= mark:
        if keyed:
            return None
        if chain_hash(*fields) == r.hash:
            return {"position": r.id, "why": "its link was computed without the audit key "
                                             "(a record was rewritten and the chain recomputed)"}
        return {"position": r.id, "why": "its content was changed after it was written "
                                         "(its link does not match under the audit key)"}
    if chain_hash(*fields) == r.hash:
        return None
    if keyed:
        return {"position": r.id, "why": f"it is keyed but {mark_path(key_file)} says keyed "
                                         f"records start at {mark}: restore that file"
                                         if mark else
                                         f"it is keyed but {mark_path(key_file)} is missing: "
                                         "restore it from the backup"}
    return {"position": r.id, "why": "its content was changed after it was written"}


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

    if not per_study:
        return
    with catalog.unit() as uow:
        pids = dict(uow.session.execute(
            select(Study.study_uid, Patient.patient_id).join(Patient, Patient.id == Study.patient_fk)
            .where(Study.study_uid.in_(list(per_study)))).all())
    for uid, detail in per_study.items():
        record_quietly(catalog, Event(action, outcome_of(detail), actor, source or host(),
                                      pids.get(uid), uid, detail))


def record_key_use(catalog: Catalog, actor: str, fingerprints: list[str], purpose: str) -> None:
    """A DR identity was used: recorded by its fingerprints, never the key itself."""
    if fingerprints:
        record_quietly(catalog, Event("key-use", actor=actor, source=host(),
                                      detail={"purpose": purpose,
                                              "fingerprints": sorted(fingerprints)}))
