"""C-FIND matching over the catalog (PS3.4 C.2.2.2 matching, C.4.1 hierarchical
search, C.6.1 Patient Root and C.6.2 Study Root). docs/query.md says what is
supported, per level.

``find`` takes the Query/Retrieve Level, the information model and the
identifier as decoded (keyword -> value; an empty value asks for the attribute
back) and returns the matches: one dict per entity at that level holding the
unique keys of that level and those above it plus every supported key asked for.
Everything is checked before the first row is read: an identifier that does not
fit the model raises IdentifierInvalid (the SCP answers 0xA900), a value that
cannot be matched ValueInvalid (0xC000), more matches than ``max_matches``
TooManyMatches (nothing is returned, so no partial answer looks complete).

What counts: an instance is its latest version within its series (an earlier
version is neither returned nor counted), whether or not any copy of it is
still readable: this answers what the archive received; whether it can be
retrieved now is the retrieve's business. Values are compared only through
bound parameters; no error message carries a value (they may be PHI).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Iterator, Mapping

from sqlalchemy import Select, and_, case, exists, func, or_, select
from sqlalchemy.sql.elements import ColumnElement

from archive.catalog.models import Copy, Instance, Patient, Series, Study
from archive.catalog.uow import Catalog
from archive.dicom import pn
from archive.errors import InvalidInput
from archive.uids import InvalidUID, validate_uid

PATIENT, STUDY, SERIES, IMAGE = "PATIENT", "STUDY", "SERIES", "IMAGE"
LEVELS = (PATIENT, STUDY, SERIES, IMAGE)
PATIENT_ROOT, STUDY_ROOT = "PATIENT_ROOT", "STUDY_ROOT"

MAX_KEYS = 256          # keys in one identifier
MAX_UIDS = 1000         # values in one list of UIDs
MAX_MODALITIES = 32     # values of ModalitiesInStudy
_BATCH = 500            # rows whose computed keys are fetched together

# Handled by the SCP, not matched here.
_IGNORED = {"QueryRetrieveLevel", "SpecificCharacterSet"}


class QueryError(InvalidInput):
    """invalid query: {}"""


class IdentifierInvalid(QueryError):
    """identifier does not fit the query model: {}"""


class ValueInvalid(QueryError):
    """query value cannot be matched: {}"""


class TooManyMatches(QueryError):
    """more than {} matches: narrow the query"""

    @property
    def limit(self) -> int:
        return int(self.args[0])


P, ST, SE, I, C = (Patient.__table__, Study.__table__, Series.__table__,
                   Instance.__table__, Copy.__table__)
I2 = Instance.__table__.alias("later")


@dataclass(frozen=True)
class _Key:
    level: int                      # index in LEVELS (Patient Root)
    vr: str                         # PN LO SH CS DA TM UI IS, or COUNT / MODALITIES
    column: Any = None
    folded: Any = None              # PN: the folded column (archive/dicom/pn.py)
    max_len: int = 64


KEYS: dict[str, _Key] = {
    "PatientName": _Key(0, "PN", P.c.name, P.c.name_fold, 194),
    "PatientID": _Key(0, "LO", P.c.patient_id),
    "IssuerOfPatientID": _Key(0, "LO", P.c.issuer),
    "PatientBirthDate": _Key(0, "DA", P.c.birth_date),
    "PatientSex": _Key(0, "CS", P.c.sex, max_len=16),
    "NumberOfPatientRelatedStudies": _Key(0, "COUNT"),
    "NumberOfPatientRelatedSeries": _Key(0, "COUNT"),
    "NumberOfPatientRelatedInstances": _Key(0, "COUNT"),
    "StudyInstanceUID": _Key(1, "UI", ST.c.study_uid),
    "StudyDate": _Key(1, "DA", ST.c.study_date),
    "StudyTime": _Key(1, "TM", ST.c.study_time),
    "AccessionNumber": _Key(1, "SH", ST.c.accession, max_len=16),
    "StudyID": _Key(1, "SH", ST.c.study_id, max_len=16),
    "ReferringPhysicianName": _Key(1, "PN", ST.c.referring_physician,
                                   ST.c.referring_physician_fold, 194),
    "StudyDescription": _Key(1, "LO", ST.c.description),
    "ModalitiesInStudy": _Key(1, "MODALITIES"),
    "NumberOfStudyRelatedSeries": _Key(1, "COUNT"),
    "NumberOfStudyRelatedInstances": _Key(1, "COUNT"),
    "SeriesInstanceUID": _Key(2, "UI", SE.c.series_uid),
    "Modality": _Key(2, "CS", SE.c.modality, max_len=16),
    "SeriesNumber": _Key(2, "IS", SE.c.series_number, max_len=12),
    "SeriesDescription": _Key(2, "LO", SE.c.series_description),
    "SeriesDate": _Key(2, "DA", SE.c.series_date),
    "SeriesTime": _Key(2, "TM", SE.c.series_time),
    "NumberOfSeriesRelatedInstances": _Key(2, "COUNT"),
    "SOPInstanceUID": _Key(3, "UI", I.c.sop_uid),
    "SOPClassUID": _Key(3, "UI", I.c.sop_class),
    "InstanceNumber": _Key(3, "IS", I.c.instance_number, max_len=12),
    # Where the entity's instances are, at the query level (PS3.4 C.4.1.1.3.2): ONLINE
    # (every one on a site), NEARLINE (some only in the object tier: a retrieve recalls
    # them), OFFLINE (some only on DR volumes, or nowhere). Computed; asked for only.
    "InstanceAvailability": _Key(1, "AVAILABILITY", max_len=16),
}
UNIQUE = {0: "PatientID", 1: "StudyInstanceUID", 2: "SeriesInstanceUID", 3: "SOPInstanceUID"}
_DATE_TIME_PAIRS = (("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"))
_RANGE_LEN = {"DA": 17, "TM": 27}          # a-b at full precision


def key_level(model: str, keyword: str) -> str:
    """The level a key belongs to in ``model`` (patient keys are study keys in Study Root)."""
    level = KEYS[keyword].level
    return LEVELS[max(level, 1) if model == STUDY_ROOT else level]


# -- the query, checked -------------------------------------------------------

@dataclass
class _Query:
    level: int
    model: str
    conditions: list = field(default_factory=list)
    returned: list[str] = field(default_factory=list)   # keywords, in the order asked
    unsupported: list[str] = field(default_factory=list)


def _check_model(level: str, model: str) -> int:
    if model not in (PATIENT_ROOT, STUDY_ROOT):
        raise IdentifierInvalid("information model must be PATIENT_ROOT or STUDY_ROOT")
    if level not in LEVELS:
        raise IdentifierInvalid("QueryRetrieveLevel must be PATIENT, STUDY, SERIES or IMAGE")
    if model == STUDY_ROOT and level == PATIENT:
        raise IdentifierInvalid("the Study Root model has no PATIENT level")
    return LEVELS.index(level)


def _unique_above(model: str, level: int) -> list[int]:
    top = 0 if model == PATIENT_ROOT else 1
    return list(range(top, level))


def _parse(level_name: str, model: str, identifier: Mapping[str, Any], *,
           case_insensitive_pn: bool, combined_datetime: bool, sqlite: bool,
           relational: bool = False) -> _Query:
    level = _check_model(level_name, model)
    if len(identifier) > MAX_KEYS:
        raise ValueInvalid(f"more than {MAX_KEYS} keys")
    q = _Query(level, model)
    values: dict[str, str] = {}
    for keyword, raw in identifier.items():
        if not isinstance(keyword, str) or len(keyword) > 64:
            raise ValueInvalid("a key is not an attribute keyword")
        if keyword in _IGNORED:
            continue
        if keyword not in KEYS:
            q.unsupported.append(keyword)
            continue
        if raw is None:
            raw = ""
        if not isinstance(raw, str):
            raise ValueInvalid(f"{keyword}: the value is not text")
        if LEVELS.index(key_level(model, keyword)) > level:
            raise IdentifierInvalid(f"{keyword} is a {key_level(model, keyword)} key, "
                                    f"below the query level {level_name}")
        values[keyword] = raw.replace("\x00", "").strip()
        q.returned.append(keyword)
    for above in ([] if relational else _unique_above(model, level)):
        keyword = UNIQUE[above]
        value = values.get(keyword, "")
        if not value or any(c in value for c in "*?\\"):
            raise IdentifierInvalid(f"{keyword} is required with a single value at the "
                                    f"{level_name} level of this model")
    pairs = {}
    if combined_datetime:
        for d, t in _DATE_TIME_PAIRS:
            if _matches_something(values.get(d, "")) and _matches_something(values.get(t, "")):
                pairs[d], pairs[t] = t, None
    for keyword, value in values.items():
        if keyword in pairs:
            if pairs[keyword] is not None:
                q.conditions.append(_combined(keyword, value, pairs[keyword],
                                              values[pairs[keyword]]))
            continue
        condition = _condition(keyword, value, case_insensitive_pn, sqlite)
        if condition is not None:
            q.conditions.append(condition)
    return q


def _matches_something(value: str) -> bool:
    return bool(value) and value.strip("*") != ""


def _condition(keyword: str, value: str, folded_pn: bool, sqlite: bool) -> Any:
    key = KEYS[keyword]
    if key.vr in ("COUNT", "AVAILABILITY"):
        if value:
            raise ValueInvalid(f"{keyword} is computed: it can only be asked for, not matched")
        return None
    if not _matches_something(value):
        return None                                     # universal: "" or "*"
    limit = (MAX_UIDS * 65 if key.vr == "UI" else MAX_MODALITIES * 17
             if key.vr == "MODALITIES" else _RANGE_LEN.get(key.vr, key.max_len))
    if len(value) > limit:
        raise ValueInvalid(f"{keyword}: longer than {limit} characters")
    if key.vr == "UI":
        return _uid_list(keyword, key.column, value)
    if key.vr == "DA":
        lo, hi = _date_range(keyword, value)
        return _between(key.column, lo, hi)
    if key.vr == "TM":
        lo, hi = _time_range(keyword, value)
        return _between(key.column, lo or "00", hi)
    if key.vr == "MODALITIES":
        return _modalities(keyword, value, sqlite)
    if "\\" in value:
        raise ValueInvalid(f"{keyword}: only UIDs and ModalitiesInStudy take several values")
    if key.vr == "IS":
        if any(c in value for c in "*?"):
            raise ValueInvalid(f"{keyword}: wildcards are not allowed for numbers")
        return key.column == value
    column = key.column
    if key.vr == "PN" and folded_pn:
        column, value = key.folded, pn.fold(value)
    return _text_match(column, value, sqlite)


def _text_match(column: Any, value: str, sqlite: bool) -> ColumnElement:
    if not any(c in value for c in "*?"):
        return column == value
    return _wildcard(column, value, sqlite)


def _wildcard(column: Any, value: str, sqlite: bool) -> ColumnElement:
    """PS3.4 C.2.2.2.4: '*' any run, '?' one character, everything else literal and
    case-sensitive. SQLite: GLOB (case-sensitive, uses the index for a literal
    prefix), '[' is its only other special character. PostgreSQL: LIKE with '!'
    escaping its own '%', '_' and '!' (a backslash escape depends on settings)."""
    if sqlite:
        pattern = "".join("[[]" if c == "[" else c for c in value)
        return column.op("GLOB", is_comparison=True)(pattern)
    out = []
    for c in value:
        if c == "*":
            out.append("%")
        elif c == "?":
            out.append("_")
        elif c in "%_!":
            out.append("!" + c)
        else:
            out.append(c)
    return column.like("".join(out), escape="!")


def _uid_list(keyword: str, column: Any, value: str) -> ColumnElement:
    parts = value.split("\\")
    if len(parts) > MAX_UIDS:
        raise ValueInvalid(f"{keyword}: more than {MAX_UIDS} UIDs")
    uids = []
    for part in parts:
        try:
            uids.append(validate_uid(part.strip(" \x00"), keyword))
        except InvalidUID:
            raise ValueInvalid(f"{keyword}: not a UID or a list of UIDs (wildcards are not "
                               f"allowed)") from None
    return column == uids[0] if len(uids) == 1 else column.in_(sorted(set(uids)))


def _modalities(keyword: str, value: str, sqlite: bool) -> ColumnElement:
    parts = [p.strip() for p in value.split("\\")]
    if len(parts) > MAX_MODALITIES or any(len(p) > 16 for p in parts):
        raise ValueInvalid(f"{keyword}: at most {MAX_MODALITIES} values of 16 characters")
    if any(not _matches_something(p) for p in parts):
        return None if all(not _matches_something(p) for p in parts) else _any_study()
    plain = sorted({p for p in parts if not any(c in p for c in "*?")})
    wild = [p for p in parts if any(c in p for c in "*?")]
    se = SE.alias("m")
    tests = ([se.c.modality.in_(plain)] if plain else []) + \
            [_wildcard(se.c.modality, p, sqlite) for p in wild]
    return ST.c.id.in_(select(se.c.study_fk).where(or_(*tests)))


def _any_study() -> ColumnElement:
    # One value universal: a study matches if it has any series (they all do).
    return ST.c.id.in_(select(SE.c.study_fk))


def _between(column: Any, lo: str | None, hi: str | None) -> ColumnElement:
    if lo is not None and lo == hi:
        return column == lo
    tests = []
    if lo is not None:
        tests.append(column >= lo)
    if hi is not None:
        tests.append(column <= hi)
    return and_(*tests)


_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^(\d\d)(\d\d)?(\d\d)?(\.\d{1,6})?$")


def _date_range(keyword: str, value: str) -> tuple[str | None, str | None]:
    """A single date (lo == hi) or a range; an open end stays None but never
    matches an empty stored value (a study without a date is not 'before')."""
    what = f"{keyword}: not a date (YYYYMMDD) or a range (a-b, -b, a-)"
    if value.count("-") > 1:
        raise ValueInvalid(what)
    if "-" not in value:
        _valid_date(value, what)
        return value, value
    lo, hi = (v.strip() for v in value.split("-"))
    if not lo and not hi:
        raise ValueInvalid(what)
    for v in (lo, hi):
        if v:
            _valid_date(v, what)
    if lo and hi and lo > hi:
        raise ValueInvalid(f"{keyword}: the range ends before it starts")
    return lo or "0", hi or None


def _valid_date(value: str, what: str) -> None:
    if not _DATE.match(value):
        raise ValueInvalid(what)
    try:
        date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        raise ValueInvalid(what) from None


def _time_range(keyword: str, value: str, wraps: bool = False) -> tuple[str | None, str | None]:
    """Bounds compared as strings against times stored as received (HH, HHMM,
    HHMMSS or HHMMSS.F...). A lower bound drops trailing zero components so a
    stored '10' (10:00) is not before '100000'; an upper bound covers the whole of
    its last component ('-1100' includes 11:00:59.999999). A single time is the
    range of its precision. An open end is None. ``wraps``: a range may end
    before it starts (past midnight, only with a date range)."""
    what = f"{keyword}: not a time (HH[MM[SS[.F]]]) or a range (a-b, -b, a-)"
    if value.count("-") > 1:
        raise ValueInvalid(what)
    if "-" not in value:
        _valid_time(value, what)
        return _time_lo(value), _time_hi(value)
    lo, hi = (v.strip() for v in value.split("-"))
    if not lo and not hi:
        raise ValueInvalid(what)
    for v in (lo, hi):
        if v:
            _valid_time(v, what)
    if lo and hi and not wraps and _time_lo(lo) > _time_hi(hi):
        raise ValueInvalid(f"{keyword}: the range ends before it starts")
    return (_time_lo(lo) if lo else None), (_time_hi(hi) if hi else None)


def _valid_time(value: str, what: str) -> None:
    m = _TIME.match(value)
    if not m or (m.group(4) and not m.group(3)):
        raise ValueInvalid(what)
    hh, mm, ss = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    if hh > 23 or mm > 59 or ss > 60:
        raise ValueInvalid(what)


def _time_lo(value: str) -> str:
    whole, _, frac = value.partition(".")
    if frac.strip("0"):
        return whole + "." + frac.rstrip("0")
    while len(whole) > 2 and whole.endswith("00"):
        whole = whole[:-2]
    return whole


def _time_hi(value: str) -> str:
    whole, _, frac = value.partition(".")
    whole = (whole + "5959"[len(whole) - 2:]) if len(whole) < 6 else whole
    return whole + "." + (frac + "999999")[:6] if frac else whole + ".999999"


def _combined(date_kw: str, date_value: str, time_kw: str, time_value: str) -> ColumnElement:
    """PS3.4 C.2.2.2.5.1: a date and a time range together as one date-time range
    (with the extended negotiation's combined flag): 20240101-20240102 with
    2300-0100 is 1 January 23:00 to 2 January 01:00."""
    dcol, tcol = KEYS[date_kw].column, KEYS[time_kw].column
    for kw, v in ((date_kw, date_value), (time_kw, time_value)):
        if len(v) > _RANGE_LEN[KEYS[kw].vr]:
            raise ValueInvalid(f"{kw}: longer than {_RANGE_LEN[KEYS[kw].vr]} characters")
    dlo, dhi = _date_range(date_kw, date_value)
    tlo, thi = _time_range(time_kw, time_value, wraps=True)
    if dlo == "0":
        dlo = None
    tests = []
    if dlo is not None:
        tests.append(or_(dcol > dlo, and_(dcol == dlo, tcol >= tlo)) if tlo else dcol >= dlo)
    else:
        tests.append(dcol >= "0")
    if dhi is not None:
        tests.append(or_(dcol < dhi, and_(dcol == dhi, tcol <= thi)) if thi else dcol <= dhi)
    return and_(*tests)


# -- the SQL ------------------------------------------------------------------

_IDS = {0: P.c.id, 1: ST.c.id, 2: SE.c.id, 3: I.c.id}


def _latest(inst: Any) -> ColumnElement:
    """The instance is the latest version of its SOP Instance UID in its series."""
    return ~exists().where(I2.c.sop_uid == inst.c.sop_uid, I2.c.series_fk == inst.c.series_fk,
                           I2.c.version > inst.c.version)


def _select(q: _Query) -> Select:
    wanted = {UNIQUE[lv] for lv in _unique_above(q.model, q.level) + [q.level]}
    wanted |= {k for k in q.returned if KEYS[k].column is not None}
    columns = [_IDS[lv].label(f"_{lv}") for lv in range(q.level + 1)]
    columns += [KEYS[k].column.label(k) for k in sorted(wanted)]
    source = P
    if q.level >= 1:
        source = ST.join(P, P.c.id == ST.c.patient_fk)
    if q.level >= 2:
        source = SE.join(ST, ST.c.id == SE.c.study_fk).join(P, P.c.id == ST.c.patient_fk)
    if q.level >= 3:
        source = I.join(SE, SE.c.id == I.c.series_fk).join(
            ST, ST.c.id == SE.c.study_fk).join(P, P.c.id == ST.c.patient_fk)
    stmt = select(*columns).select_from(source).where(*q.conditions)
    if q.level >= 3:
        stmt = stmt.where(_latest(I))
    return stmt


class Matches:
    """The matches of one query, counted before the first is returned."""

    def __init__(self, catalog: Catalog, q: _Query, rows: list) -> None:
        self._catalog, self._q, self._rows = catalog, q, rows
        self.unsupported = list(q.unsupported)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[dict[str, str]]:
        q = self._q
        keys = [UNIQUE[lv] for lv in _unique_above(q.model, q.level) + [q.level]]
        keys += [k for k in q.returned if k not in keys]
        for start in range(0, len(self._rows), _BATCH):
            batch = self._rows[start:start + _BATCH]
            computed = self._computed(batch)
            for row in batch:
                m = row._mapping
                out = {}
                for k in keys:
                    if k in computed:
                        out[k] = computed[k].get(m[f"_{self._level(k)}"], "")
                    else:
                        v = m[k]
                        out[k] = "" if v is None else str(v)
                yield out

    def _level(self, keyword: str) -> int:
        return self._q.level if KEYS[keyword].vr == "AVAILABILITY" else KEYS[keyword].level

    def _computed(self, batch: list) -> dict[str, dict[int, str]]:
        wanted = [k for k in self._q.returned if KEYS[k].column is None]
        if not wanted:
            return {}
        out: dict[str, dict[int, str]] = {}
        with self._catalog.engine.connect() as conn:
            for k in wanted:
                ids = sorted({row._mapping[f"_{self._level(k)}"] for row in batch})
                if k == "InstanceAvailability":
                    out[k] = _availability(conn, self._q.level, ids)
                elif k == "ModalitiesInStudy":
                    joined: dict[int, list[str]] = {}
                    for study, modality in conn.execute(
                            select(SE.c.study_fk, SE.c.modality).distinct()
                            .where(SE.c.study_fk.in_(ids), SE.c.modality != "")):
                        joined.setdefault(study, []).append(modality)
                    out[k] = {s: "\\".join(sorted(m)) for s, m in joined.items()}
                else:
                    counts = dict(conn.execute(_count_sql(k, ids)).all())
                    out[k] = {i: str(counts.get(i, 0)) for i in ids}
        return out


def _availability(conn: Any, level: int, ids: list[int]) -> dict[int, str]:
    group = {1: I.c.study_fk, 2: I.c.series_fk, 3: I.c.id}[level]
    online = exists().where(C.c.instance_fk == I.c.id, C.c.state == "ok",
                            C.c.bundle_fk.is_(None))
    anywhere = exists().where(C.c.instance_fk == I.c.id, C.c.state == "ok")
    rows = conn.execute(select(group, func.count(), func.sum(case((online, 1), else_=0)),
                               func.sum(case((anywhere, 1), else_=0)))
                        .where(group.in_(ids), _latest(I)).group_by(group))
    out = {}
    for entity, total, on, kept in rows:
        out[entity] = "ONLINE" if on == total else "NEARLINE" if kept == total else "OFFLINE"
    return out


def _count_sql(keyword: str, ids: list[int]) -> Select:
    inst_study = I.c.study_fk
    if keyword == "NumberOfPatientRelatedStudies":
        return select(ST.c.patient_fk, func.count()).where(ST.c.patient_fk.in_(ids)) \
            .group_by(ST.c.patient_fk)
    if keyword == "NumberOfPatientRelatedSeries":
        return select(ST.c.patient_fk, func.count()).select_from(
            SE.join(ST, ST.c.id == SE.c.study_fk)).where(ST.c.patient_fk.in_(ids)) \
            .group_by(ST.c.patient_fk)
    if keyword == "NumberOfPatientRelatedInstances":
        return select(ST.c.patient_fk, func.count()).select_from(
            I.join(ST, ST.c.id == inst_study)).where(ST.c.patient_fk.in_(ids), _latest(I)) \
            .group_by(ST.c.patient_fk)
    if keyword == "NumberOfStudyRelatedSeries":
        return select(SE.c.study_fk, func.count()).where(SE.c.study_fk.in_(ids)) \
            .group_by(SE.c.study_fk)
    if keyword == "NumberOfStudyRelatedInstances":
        return select(inst_study, func.count()).where(inst_study.in_(ids), _latest(I)) \
            .group_by(inst_study)
    if keyword == "NumberOfSeriesRelatedInstances":
        return select(I.c.series_fk, func.count()).where(I.c.series_fk.in_(ids), _latest(I)) \
            .group_by(I.c.series_fk)
    raise AssertionError(keyword)


# -- the entry point ----------------------------------------------------------

def find(catalog: Catalog, level: str, model: str, identifier: Mapping[str, Any], *,
         max_matches: int, case_insensitive_pn: bool = True,
         combined_datetime: bool = False, relational: bool = False) -> Matches:
    """Match ``identifier`` at ``level`` of ``model`` (PATIENT_ROOT or STUDY_ROOT).

    Raises IdentifierInvalid, ValueInvalid or TooManyMatches before returning.
    ``case_insensitive_pn``: person names match regardless of case (PS3.4 lets
    the SCP choose; most archives do). ``combined_datetime``: a date and a time
    key of the same level match as one date-time range (the C-FIND extended
    negotiation flag), otherwise each on its own. ``relational``: the unique keys
    of the levels above may be left out or matched like any other key (QIDO-RS
    searches every series or instance; a hierarchical C-FIND names its parents).
    """
    if max_matches < 1:
        raise ValueError("max_matches must be at least 1")
    sqlite = catalog.engine.dialect.name == "sqlite"
    q = _parse(level, model, identifier, case_insensitive_pn=case_insensitive_pn,
               combined_datetime=combined_datetime, sqlite=sqlite, relational=relational)
    with catalog.engine.connect() as conn:
        rows = conn.execute(_select(q).limit(max_matches + 1)).all()
    if len(rows) > max_matches:
        raise TooManyMatches(max_matches)
    rows.sort(key=lambda r: tuple(r._mapping[f"_{lv}"] for lv in range(q.level + 1)))
    return Matches(catalog, q, rows)
