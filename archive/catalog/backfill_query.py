"""Fill the query attributes (migration 0010) of objects stored before ingest read them.

Only rows whose columns are still NULL are touched, so a run that stops (a
crash, Ctrl-C) is resumed by running it again, and a second run finds nothing
to do. Each object is read from a copy the caller can open (an online copy
first, else its frame in the study's bundle on the object tier), only the tags
the catalog keeps (pydicom skips the rest, pixel data included), one batch at a
time: memory stays the same at 10 million instances, and the catalog's write
lock is taken only for each batch's updates, never while files are read.
Objects with no readable copy (only on DR volumes, or every copy damaged) are
left NULL and counted; a later run tries them again.

Logs carry counts only: no names, IDs, UIDs or object keys.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import BinaryIO, Callable, Mapping

from sqlalchemy import select, update

from archive.catalog.models import Copy, Instance, Patient, Series, Study
from archive.catalog.uow import Catalog
from archive.dicom import pn
from archive.dicom.attributes import ReceivedAttributes, read_attributes
from archive.errors import PacsvaultError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StoredCopy:
    """One good copy of an instance, as the catalog records it."""
    location: str
    key: str
    bundle_fk: int | None          # object tier: the bundle and the frame in it
    frame_offset: int | None
    frame_length: int | None
    size: int
    sha256: str


# location (site or tier name) -> open(copy): a readable binary file of the stored
# object. Tried in the mapping's order (put the cheap ones first).
Sources = Mapping[str, Callable[[StoredCopy], BinaryIO]]


@dataclass
class BackfillReport:
    names: int = 0          # patient names folded
    instances: int = 0      # instances given their instance number
    series: int = 0
    studies: int = 0
    unreadable: int = 0     # instances left NULL: no copy could be read
    unread_parents: int = 0  # series and studies left NULL for the same reason

    def __str__(self) -> str:
        return (f"{self.instances} instances, {self.series} series, {self.studies} studies, "
                f"{self.names} patient names; {self.unreadable} instances and "
                f"{self.unread_parents} series/studies without a readable copy")


def backfill_query_attributes(catalog: Catalog, sources: Sources, *, batch: int = 500,
                              progress: Callable[[BackfillReport], None] | None = None
                              ) -> BackfillReport:
    report = BackfillReport()
    _fold_names(catalog, report, batch)
    _by_instance(catalog, sources, report, batch, progress)
    _by_parent(catalog, sources, report, batch, Series, Series.series_description,
               Instance.series_fk)
    _by_parent(catalog, sources, report, batch, Study, Study.study_id, Instance.study_fk)
    _fold_names(catalog, report, batch)
    log.info("query attributes backfilled: %s", report)
    return report


def _fold_names(catalog: Catalog, report: BackfillReport, batch: int) -> None:
    """Folded names: from the catalog's own columns, no object read."""
    for model, name, folded, counts in (
            (Patient, Patient.name, Patient.name_fold, True),
            (Study, Study.referring_physician, Study.referring_physician_fold, False)):
        after = 0
        while True:
            with catalog.unit() as uow:
                rows = uow.session.execute(
                    select(model.id, name).where(folded.is_(None), name.is_not(None),
                                                 model.id > after)
                    .order_by(model.id).limit(batch)).all()
            if not rows:
                break
            with catalog.unit(write=True) as uow:
                for id_, value in rows:
                    uow.session.execute(update(model).where(model.id == id_, folded.is_(None))
                                        .values({folded: pn.fold(value)}))
                uow.commit()
            after = rows[-1][0]
            if counts:
                report.names += len(rows)


def _read(sources: Sources, copies: list[StoredCopy]) -> ReceivedAttributes | None:
    for copy in copies:
        opener = sources.get(copy.location)
        if opener is None:
            continue
        try:
            with opener(copy) as f:
                return read_attributes(f)
        except (PacsvaultError, OSError, ValueError):
            continue                    # gone, damaged (a bad frame too) or offline: the next
    return None


def _online_copies(catalog: Catalog, sources: Sources, instance_ids: list[int]
                   ) -> dict[int, list[StoredCopy]]:
    """Each instance's good copies in ``sources``, in the order the mapping gives."""
    out: dict[int, list[StoredCopy]] = {}
    if not instance_ids:
        return out
    rank = {name: i for i, name in enumerate(sources)}
    with catalog.unit() as uow:
        for r in uow.session.execute(
                select(Copy.instance_fk, Copy.location, Copy.key, Copy.bundle_fk,
                       Copy.frame_offset, Copy.frame_length, Instance.size, Instance.sha256)
                .join(Instance, Instance.id == Copy.instance_fk)
                .where(Copy.instance_fk.in_(instance_ids), Copy.state == "ok",
                       Copy.location.in_(sorted(sources)))
                .order_by(Copy.instance_fk, Copy.location)):
            out.setdefault(r.instance_fk, []).append(StoredCopy(
                r.location, r.key, r.bundle_fk, r.frame_offset, r.frame_length, r.size, r.sha256))
    for copies in out.values():
        copies.sort(key=lambda c: rank[c.location])
    return out


def _series_values(a: ReceivedAttributes) -> dict:
    return {Series.series_description: a.series_description, Series.series_date: a.series_date,
            Series.series_time: a.series_time}


def _study_values(a: ReceivedAttributes) -> dict:
    return {Study.study_id: a.study_id, Study.referring_physician: a.referring_physician,
            Study.referring_physician_fold: a.referring_physician_fold}


def _by_instance(catalog: Catalog, sources: Sources, report: BackfillReport, batch: int,
                 progress: Callable[[BackfillReport], None] | None) -> None:
    """Every instance without its number; its series and study on the way."""
    after = 0
    while True:
        with catalog.unit() as uow:
            rows = uow.session.execute(
                select(Instance.id, Instance.series_fk, Instance.study_fk,
                       Series.series_description.is_(None), Study.study_id.is_(None))
                .join(Series, Series.id == Instance.series_fk)
                .join(Study, Study.id == Instance.study_fk)
                .where(Instance.instance_number.is_(None), Instance.id > after)
                .order_by(Instance.id).limit(batch)).all()
        if not rows:
            return
        after = rows[-1][0]
        copies = _online_copies(catalog, sources, [r[0] for r in rows])
        found: list[tuple[int, int, int, bool, bool, ReceivedAttributes]] = []
        series_done: set[int] = set()
        studies_done: set[int] = set()
        for inst, series_fk, study_fk, series_open, study_open in rows:
            attrs = _read(sources, copies.get(inst, []))
            if attrs is None:
                report.unreadable += 1
                continue
            found.append((inst, series_fk, study_fk, series_open and series_fk not in series_done,
                          study_open and study_fk not in studies_done, attrs))
            if series_open:
                series_done.add(series_fk)
            if study_open:
                studies_done.add(study_fk)
        with catalog.unit(write=True) as uow:
            s = uow.session
            for inst, series_fk, study_fk, series_open, study_open, a in found:
                s.execute(update(Instance).where(Instance.id == inst,
                                                 Instance.instance_number.is_(None))
                          .values(instance_number=a.instance_number))
                if series_open:
                    report.series += s.execute(
                        update(Series).where(Series.id == series_fk,
                                             Series.series_description.is_(None))
                        .values(_series_values(a))).rowcount
                if study_open:
                    report.studies += s.execute(
                        update(Study).where(Study.id == study_fk, Study.study_id.is_(None))
                        .values(_study_values(a))).rowcount
            uow.commit()
        report.instances += len(found)
        if progress is not None:
            progress(report)


def _by_parent(catalog: Catalog, sources: Sources, report: BackfillReport, batch: int,
               model: type, marker, instance_fk) -> None:  # noqa: ANN001
    """Series (or studies) still NULL although their instances are not (their
    instances were numbered at ingest): read one readable instance of each."""
    values = _series_values if model is Series else _study_values
    after = 0
    while True:
        with catalog.unit() as uow:
            parents = list(uow.session.scalars(
                select(model.id).where(marker.is_(None), model.id > after)
                .order_by(model.id).limit(batch)))
        if not parents:
            return
        after = parents[-1]
        filled: list[tuple[int, ReceivedAttributes]] = []
        for parent in parents:
            with catalog.unit() as uow:
                members = list(uow.session.scalars(
                    select(Instance.id).where(instance_fk == parent).order_by(Instance.id)
                    .limit(20)))
            copies = _online_copies(catalog, sources, members)
            attrs = None
            for inst in members:
                attrs = _read(sources, copies.get(inst, []))
                if attrs is not None:
                    break
            if attrs is None:
                report.unread_parents += 1
            else:
                filled.append((parent, attrs))
        with catalog.unit(write=True) as uow:
            for parent, a in filled:
                n = uow.session.execute(update(model).where(model.id == parent, marker.is_(None))
                                        .values(values(a))).rowcount
                if model is Series:
                    report.series += n
                else:
                    report.studies += n
            uow.commit()
