"""The volume list: what `dr volumes` and status show about DR volumes."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select

from archive.catalog.models import DrVolume
from archive.catalog.uow import Catalog
from archive.clock import Clock, iso, utcnow
from dr.custody import aware, recyclable
from dr.format import UNSEALED_OR_GONE


def list_volumes(catalog: Catalog, pool: str | None = None,
                 clock: Clock = utcnow) -> list[dict[str, Any]]:
    now = clock()
    q = select(DrVolume).order_by(DrVolume.id)
    if pool:
        q = q.where(DrVolume.pool == pool)
    out = []
    with catalog.unit() as uow:
        for v in uow.session.scalars(q):
            out.append({
                "barcode": v.barcode, "pool": v.pool, "volume_set": v.volume_set,
                "sequence": v.sequence, "state": v.state, "location": v.location,
                "kind": v.kind, "device": v.device, "capacity": v.capacity, "bytes": v.bytes,
                "segments": v.segments, "studies": v.studies, "continues": v.continues,
                "created_at": iso(v.created_at), "sealed_at": iso(v.sealed_at),
                "retain_until": iso(v.retain_until), "stream_sha256": v.stream_sha256,
                # Past its retention and at rest (in-library, offsite, returned, expired):
                # the same rule as 'dr rotation' (dr/custody.py).
                "recyclable": recyclable(v, now),
            })
    return out


def rotation(catalog: Catalog, days: int = 30, pool: str | None = None,
             clock: Clock = utcnow) -> dict[str, Any]:
    """Volumes that may be recycled now, and those whose retention ends within ``days``.

    'upcoming' also holds volumes already past retention but not at rest yet
    (sealed, in transit, recalled): they become recyclable once they are.
    """
    now = clock()
    horizon = now + timedelta(days=days)
    q = select(DrVolume).where(DrVolume.retain_until.is_not(None),
                               DrVolume.state.not_in(UNSEALED_OR_GONE))
    if pool:
        q = q.where(DrVolume.pool == pool)
    now_rows, soon = [], []
    with catalog.unit() as uow:
        for v in uow.session.scalars(q.order_by(DrVolume.retain_until, DrVolume.id)):
            row = {"barcode": v.barcode, "pool": v.pool, "volume_set": v.volume_set,
                   "sequence": v.sequence, "state": v.state, "location": v.location,
                   "sealed_at": iso(v.sealed_at), "retain_until": iso(v.retain_until)}
            if recyclable(v, now):
                now_rows.append(row)
            elif aware(v.retain_until) <= horizon:
                soon.append(row)
    return {"at": iso(now), "days": days, "recyclable": now_rows, "upcoming": soon}
