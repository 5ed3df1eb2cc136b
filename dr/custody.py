"""Chain of custody of DR volumes: the legal moves, recording one, reading the chain back.

The log (dr_custody) is append-only *by this code*: nothing here, or anywhere
else, updates or deletes its rows. A move appends one row and updates the
volume's state and location in the same transaction, so the volume row and
the chain cannot disagree unless someone edits the catalog by hand, which
check_chain() then reports. docs/operations/dr.md, "Chain of custody and rotation".

The custody rows themselves carry no key, so anyone who can write the catalog could
rewrite where a past move went or who made it consistently. Every move made through
`dr custody` is also an audit record (dr-volume-moved), and the audit trail is
chained under a key kept outside the catalog: check_chain() compares the two, so a
rewritten, added or deleted custody row shows up as a disagreement with the trail.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import select

from archive.catalog.models import AuditRecord, DrCustody, DrVolume
from archive.catalog.uow import Catalog
from archive.clock import Clock, iso, utcnow
from archive.errors import InvalidInput
from dr.format import (
    CUSTODY_STATES,
    DESTROYED,
    EXPIRED,
    FAILED,
    IN_LIBRARY,
    IN_TRANSIT,
    OFFSITE,
    RECALLED,
    RETURNED,
    SEALED,
    WRITING,
)

# Custody states (dr/format.py), in the order a volume usually lives them; the writer's
# states are not custody states: a volume cannot be moved into them.
STATES = CUSTODY_STATES

# from -> the states it may move to. Anything not listed is refused. 'writing'
# cannot move (the writer holds it); a 'failed' volume counts for nothing and may
# only be destroyed; 'destroyed' is final. Nothing goes back to 'sealed': a
# recycled cartridge is a new volume with a new barcode.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    SEALED: (IN_LIBRARY, IN_TRANSIT),
    IN_LIBRARY: (IN_TRANSIT, EXPIRED),
    IN_TRANSIT: (OFFSITE, IN_LIBRARY, RETURNED),
    OFFSITE: (RECALLED, IN_TRANSIT, EXPIRED),
    RECALLED: (IN_TRANSIT, IN_LIBRARY, RETURNED),
    RETURNED: (IN_LIBRARY, OFFSITE, IN_TRANSIT, EXPIRED),
    EXPIRED: (DESTROYED, IN_LIBRARY),
    FAILED: (DESTROYED,),
    WRITING: (),
    DESTROYED: (),
}

# Past its retention, a volume in one of these states may be recycled (rotation):
# it is at rest in a known place, not travelling and not wanted for a restore.
RECYCLABLE_STATES = (IN_LIBRARY, OFFSITE, RETURNED, EXPIRED)

# Column widths of dr_custody (migration 0006): refuse rather than truncate.
LIMITS = {"location": 128, "actor": 128, "courier_ref": 128, "note": 512}
WRITER_ACTOR = "pacsvault dr write"


def clean_text(what: str, value: str | None, *, required: bool = False) -> str:
    """Trimmed text fit for the log and a printed manifest, or InvalidInput.

    Control and format characters (newlines, ESC, bidi overrides) are refused:
    they could forge extra lines in a terminal or on paper.
    """
    v = (value or "").strip()
    if required and not v:
        raise InvalidInput(f"--{_flag(what)} must not be empty")
    if len(v) > LIMITS[what]:
        raise InvalidInput(f"--{_flag(what)} is {len(v)} characters long; at most {LIMITS[what]}")
    if not all(c.isprintable() for c in v):
        raise InvalidInput(f"--{_flag(what)}: control characters are not allowed")
    return v


def _flag(what: str) -> str:
    return {"actor": "by", "courier_ref": "courier"}.get(what, what)


def check_barcode(barcode: str) -> str:
    # Checked before it is echoed in an error message.
    if not barcode or len(barcode) > 32 or not all(c.isprintable() for c in barcode):
        raise InvalidInput("barcode: 1 to 32 printable characters")
    return barcode


def aware(t: datetime | None) -> datetime | None:
    """SQLite hands back naive UTC datetimes; compare them as aware ones."""
    if t is not None and t.tzinfo is None:
        t = t.replace(tzinfo=utcnow().tzinfo)
    return t


def recyclable(v: DrVolume, now: datetime) -> bool:
    until = aware(v.retain_until)
    return until is not None and until <= now and v.state in RECYCLABLE_STATES


def move(catalog: Catalog, barcode: str, to_state: str, location: str, actor: str,
         courier_ref: str = "", note: str = "", clock: Clock = utcnow) -> dict[str, Any]:
    """Record one move of a volume; return the event. Refused moves record nothing."""
    check_barcode(barcode)
    if to_state not in STATES:
        raise InvalidInput(f"--to: unknown state; one of {', '.join(STATES[1:])}")
    location = clean_text("location", location, required=True)
    actor = clean_text("actor", actor, required=True)
    courier_ref = clean_text("courier_ref", courier_ref)
    note = clean_text("note", note)
    with catalog.unit(write=True) as uow:
        # FOR UPDATE: two operators moving the same volume at once are serialised
        # on PostgreSQL (SQLite: the write lock is already held).
        v = uow.session.scalars(select(DrVolume).where(DrVolume.barcode == barcode)
                                .with_for_update()).first()
        if v is None:
            raise InvalidInput(f"no volume with barcode {barcode} in the catalog")
        now = clock()
        if to_state not in TRANSITIONS.get(v.state, ()):
            allowed = ", ".join(TRANSITIONS.get(v.state, ())) or "none"
            raise InvalidInput(f"{barcode} is {v.state}: it cannot move to {to_state} "
                               f"(allowed: {allowed})")
        if to_state == EXPIRED:
            until = aware(v.retain_until)
            if until is None:
                raise InvalidInput(f"{barcode} has no retention date in the catalog: "
                                   "it cannot expire")
            if now < until:
                raise InvalidInput(f"{barcode} is retained until {until.date().isoformat()}: "
                                   "it cannot expire before")
        row = DrCustody(volume_fk=v.id, from_state=v.state, to_state=to_state, location=location,
                        actor=actor, courier_ref=courier_ref, note=note, at=now)
        uow.session.add(row)
        v.state, v.location = to_state, location
        uow.commit()
        return _event(row, barcode)


def _event(r: DrCustody, barcode: str) -> dict[str, Any]:
    return {"barcode": barcode, "id": r.id, "from_state": r.from_state, "to_state": r.to_state,
            "at": iso(r.at), "location": r.location, "actor": r.actor,
            "courier_ref": r.courier_ref, "note": r.note, "implicit": False}


def _initial(v: DrVolume) -> tuple[str, datetime | None]:
    """The state the writer left the volume in (it logs no custody row)."""
    if v.sealed_at is not None:
        return SEALED, v.sealed_at
    return (WRITING if v.state == WRITING else FAILED), v.created_at


def _load(catalog: Catalog, barcode: str) -> tuple[DrVolume, list[DrCustody]]:
    check_barcode(barcode)
    with catalog.unit() as uow:
        v = uow.session.scalars(select(DrVolume).where(DrVolume.barcode == barcode)).first()
        if v is None:
            raise InvalidInput(f"no volume with barcode {barcode} in the catalog")
        rows = list(uow.session.scalars(select(DrCustody).where(DrCustody.volume_fk == v.id)
                                        .order_by(DrCustody.id)))
        uow.session.expunge_all()       # keep the loaded values: leaving the unit rolls back
    return v, rows


def history(catalog: Catalog, barcode: str) -> list[dict[str, Any]]:
    """The implicit first event (the writer's seal), then every logged move, oldest first."""
    v, rows = _load(catalog, barcode)
    state, at = _initial(v)
    first = {"barcode": barcode, "id": None, "from_state": None, "to_state": state,
             "at": iso(at), "location": "", "actor": WRITER_ACTOR, "courier_ref": "",
             "note": "written by the DR writer (not a logged move)", "implicit": True}
    return [first] + [_event(r, barcode) for r in rows]


def check_chain(catalog: Catalog, barcode: str) -> dict[str, Any]:
    """Is the logged chain continuous, legal and in agreement with the volume row?"""
    v, rows = _load(catalog, barcode)
    state, at = _initial(v)
    prev_to, prev_at, prev_loc = state, aware(at), ""
    until = aware(v.retain_until)
    problems = []
    for r in rows:
        if r.from_state != prev_to:
            problems.append(f"move {r.id}: from {r.from_state}, but the previous move ended "
                            f"in {prev_to}")
        if r.to_state not in TRANSITIONS.get(r.from_state, ()):
            problems.append(f"move {r.id}: {r.from_state} -> {r.to_state} is not a legal move")
        t = aware(r.at)
        if prev_at is not None and t < prev_at:
            problems.append(f"move {r.id}: recorded at {iso(t)}, before the previous event "
                            f"({iso(prev_at)})")
        if r.to_state == EXPIRED and (until is None or t < until):
            problems.append(f"move {r.id}: expired at {iso(t)}, before its retention ended")
        prev_to, prev_at, prev_loc = r.to_state, t, r.location
    if v.state != prev_to:
        problems.append(f"the volume is {v.state}, but its chain ends in {prev_to}")
    if rows and v.location != prev_loc:
        problems.append("the volume's location differs from the last move's")
    problems += _audit_disagreements(catalog, barcode, rows)
    return {"barcode": barcode, "ok": not problems, "moves": len(rows), "state": v.state,
            "problems": problems}


# What a dr-volume-moved audit record says of a move (archive/cli/dr.py writes it).
AUDITED_FIELDS = ("from_state", "to_state", "location", "actor", "courier_ref")


def _audited_moves(catalog: Catalog, barcode: str) -> list[tuple[int, tuple]]:
    """(audit record id, move fields) of every successful dr-volume-moved record
    naming this barcode, in the order they were recorded."""
    with catalog.unit() as uow:
        recs = uow.session.execute(
            select(AuditRecord.id, AuditRecord.detail)
            .where(AuditRecord.action == "dr-volume-moved", AuditRecord.outcome == "success")
            .order_by(AuditRecord.id)).all()
    moves = []
    for rec_id, detail in recs:
        try:
            d = json.loads(detail or "{}")
        except ValueError:
            continue                    # a broken record is audit --verify's to report
        if isinstance(d, dict) and d.get("barcode") == barcode:
            moves.append((rec_id, tuple(d.get(k, "") for k in AUDITED_FIELDS)))
    return moves


def _audit_disagreements(catalog: Catalog, barcode: str,
                         rows: list[DrCustody]) -> list[str]:
    """Compare the custody rows with the audit trail's record of the same moves.

    A volume moved only through the library API (no audit record at all) has
    nothing to compare; once the trail names a move of this volume, the custody
    log must hold exactly the audited moves, in the same order.
    """
    audited = _audited_moves(catalog, barcode)
    if not audited:
        return []
    logged = [tuple(getattr(r, k) or "" for k in AUDITED_FIELDS) for r in rows]
    problems = []
    for i in range(max(len(logged), len(audited))):
        if i >= len(logged):
            problems.append(f"audit record {audited[i][0]} names a move that the custody "
                            "log does not hold")
        elif i >= len(audited):
            problems.append(f"move {rows[i].id} has no audit record")
        elif logged[i] != audited[i][1]:
            fields = [k for k, a, b in zip(AUDITED_FIELDS, logged[i], audited[i][1]) if a != b]
            problems.append(f"move {rows[i].id} differs from audit record {audited[i][0]} "
                            f"in {', '.join(fields)}")
    return problems
