"""Recovery point exposure: acknowledged data not yet protected at each level.

For each level, the instances (and bytes) that would be lost if everything
above that level were lost now, and the age of the oldest of them:

* ``second_site``: a copy still to be made on a site (the repair queue);
* ``object_tier``: no verified copy in a study bundle on the object tier;
* ``dr``: not on a sealed DR volume of the pool;
* ``offsite``: not on a DR volume whose custody state is 'offsite'.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, select

from archive.catalog.models import Copy, DrInstance, DrSegment, DrVolume, Instance
from archive.clock import Clock, utcnow
from archive.config.schema import Settings
from dr.format import GOOD_STATES


def _on_volumes(pool: str, states: tuple[str, ...]):  # noqa: ANN202
    return exists().where(and_(DrInstance.instance_fk == Instance.id,
                               DrInstance.part == DrInstance.parts - 1,
                               DrSegment.id == DrInstance.segment_fk,
                               DrVolume.id == DrSegment.volume_fk,
                               DrVolume.pool == pool, DrVolume.state.in_(states)))


def exposure(session, settings: Settings, clock: Clock = utcnow) -> dict[str, Any]:  # noqa: ANN001
    pool = settings.dr.pool
    missing = exists().where(Copy.instance_fk == Instance.id,
                             Copy.location.in_([s.name for s in settings.sites]),
                             Copy.state == "missing")
    on_tier = exists().where(Copy.instance_fk == Instance.id,
                             Copy.location == settings.objects.name, Copy.state == "ok")
    levels = {
        "second_site": missing,
        "object_tier": ~on_tier,
        "dr": ~_on_volumes(pool, GOOD_STATES),
        "offsite": ~_on_volumes(pool, ("offsite",)),
    }
    now = clock()
    out = {}
    for name, cond in levels.items():
        n, b, oldest = session.execute(
            select(func.count(), func.coalesce(func.sum(Instance.size), 0),
                   func.min(Instance.received_at)).where(cond)).one()
        out[name] = {"objects": int(n), "bytes": int(b), "oldest_age_s": _age(oldest, now)}
    return out


def _age(t: datetime | None, now: datetime) -> float | None:
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=now.tzinfo)
    return round(max(0.0, (now - t).total_seconds()), 1)
