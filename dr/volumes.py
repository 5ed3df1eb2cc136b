"""The volume list: what `dr volumes` and status show about DR volumes."""
from __future__ import annotations

from typing import Any

from sqlalchemy import select

from archive.catalog.models import DrVolume
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from archive.jobs import _iso


def list_volumes(catalog: Catalog, pool: str | None = None,
                 clock: Clock = utcnow) -> list[dict[str, Any]]:
    now = clock()
    q = select(DrVolume).order_by(DrVolume.id)
    if pool:
        q = q.where(DrVolume.pool == pool)
    out = []
    with catalog.unit() as uow:
        for v in uow.session.scalars(q):
            until = v.retain_until
            if until is not None and until.tzinfo is None:
                until = until.replace(tzinfo=now.tzinfo)
            out.append({
                "barcode": v.barcode, "pool": v.pool, "volume_set": v.volume_set,
                "sequence": v.sequence, "state": v.state, "location": v.location,
                "kind": v.kind, "device": v.device, "capacity": v.capacity, "bytes": v.bytes,
                "segments": v.segments, "studies": v.studies, "continues": v.continues,
                "created_at": _iso(v.created_at), "sealed_at": _iso(v.sealed_at),
                "retain_until": _iso(v.retain_until), "stream_sha256": v.stream_sha256,
                # Past its retention a volume may be recycled (after 'dr custody --to expired').
                "recyclable": until is not None and until <= now
                and v.state not in ("writing", "destroyed"),
            })
    return out
