"""The catalog row is committed while the copies are written: what an instance in
flight means for duplicates, for failures, and after a crash (replication/in_flight.py)."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from archive.app.ingest import IngestService, Outcome, StoreRequest
from archive.catalog.engine import make_engine, upgrade
from archive.catalog.models import Copy, IngestInFlight, Instance
from archive.catalog.uow import Catalog
from archive.clock import utcnow
from replication.in_flight import settle_in_flight
from replication.mirror import MirrorWriter
from tests.support.dataset import make_instance
from tests.support.verify import audit
from tiers.backend import Unavailable
from tiers.fs import FilesystemBackend


class GatedSite(FilesystemBackend):
    """A site whose writes wait for ``gate`` (a slow disk) or fail while ``down``."""
    down = False

    def __init__(self, *a, **kw) -> None:  # noqa: ANN002, ANN003
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.gate.set()

    def put(self, key, payload, *, replace=False):  # noqa: ANN001, ANN201
        assert self.gate.wait(10)
        if self.down:
            raise Unavailable("put", self.name, "injected")
        return super().put(key, payload, replace=replace)


@pytest.fixture
def env(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/c.db"
    engine = make_engine(url)
    upgrade(engine)
    catalog = Catalog(engine)
    a, b = GatedSite("site-a", tmp_path / "a"), GatedSite("site-b", tmp_path / "b")
    a.initialize(), b.initialize()
    mirror = MirrorWriter([a, b], timeout_s=10, retry_after_s=0)
    ingest = IngestService(catalog, mirror)
    yield url, catalog, a, b, ingest, tmp_path
    ingest.close()
    mirror.close()
    catalog.close()


def req(m) -> StoreRequest:  # noqa: ANN001
    return StoreRequest(m.path, m.sop_class, m.sop_uid, m.transfer_syntax, "T")


def rows(catalog: Catalog, q):  # noqa: ANN001, ANN201
    with catalog.unit() as uow:
        return uow.session.execute(q).all()


def test_the_row_is_committed_while_the_copies_are_written_and_settled_after(env):
    url, catalog, a, b, ingest, tmp = env
    m = make_instance(tmp / "1.dcm", size=3000)
    a.gate.clear()                              # site A's write hangs for now
    result: list = []
    t = threading.Thread(target=lambda: result.append(ingest.store(req(m))))
    t.start()
    for _ in range(200):                        # the row is there before the copies are
        if rows(catalog, select(IngestInFlight)):
            break
        threading.Event().wait(0.01)
    assert len(rows(catalog, select(IngestInFlight))) == 1
    assert not result, "answered before its copies were written"
    a.gate.set()
    t.join(10)
    assert result[0].outcome is Outcome.STORED
    ingest.committer.drain()
    assert rows(catalog, select(IngestInFlight)) == []
    res = audit(url, {"site-a": a.root, "site-b": b.root})
    assert res.instances == 1 and res.ok_copies == 2 and not res.bad


def test_a_copy_that_fails_is_missing_at_the_answer(env):
    url, catalog, a, b, ingest, tmp = env
    b.down = True
    r = ingest.store(req(make_instance(tmp / "1.dcm", size=3000)))
    assert r.outcome is Outcome.STORED and r.missing_sites == ["site-b"]
    states = dict(rows(catalog, select(Copy.location, Copy.state)))
    assert states == {"site-a": "ok", "site-b": "missing"}


def test_no_verified_copy_undoes_the_row(env):
    url, catalog, a, b, ingest, tmp = env
    a.down = b.down = True
    r = ingest.store(req(make_instance(tmp / "1.dcm", size=3000)))
    assert r.outcome is Outcome.NO_COPY
    assert rows(catalog, select(Instance)) == [] and rows(catalog, select(Copy)) == []
    assert rows(catalog, select(IngestInFlight)) == []


def test_a_resend_of_an_object_still_in_flight_is_written_again_before_its_answer(env):
    """A row in flight does not prove the bytes are kept (a crash may have cut the
    copies): the re-send is acknowledged only after writing them itself."""
    url, catalog, a, b, ingest, tmp = env
    m = make_instance(tmp / "1.dcm", size=3000)
    assert ingest.store(req(m)).outcome is Outcome.STORED
    ingest.committer.drain()
    (instance_id,) = rows(catalog, select(Instance.id))[0]
    with catalog.unit(write=True) as uow:       # as a crash between commit and copies leaves it
        uow.session.add(IngestInFlight(instance_fk=instance_id, started_at=utcnow()))
        uow.commit()
    for p in list(a.root.rglob("*.dcm")):
        p.unlink()                              # site A's copy never made it
    r = ingest.store(req(m))
    assert r.outcome is Outcome.DUPLICATE
    assert rows(catalog, select(IngestInFlight)) == []
    res = audit(url, {"site-a": a.root, "site-b": b.root})
    assert res.instances == 1 and res.ok_copies == 2 and not res.bad


def _in_flight_leftover(env, name: str, keep: set[str]):  # noqa: ANN001, ANN201
    """Store an object, then make it look cut by a crash: marked in flight, and only
    the sites in ``keep`` holding their file."""
    url, catalog, a, b, ingest, tmp = env
    m = make_instance(tmp / name, size=3000)
    assert ingest.store(req(m)).outcome is Outcome.STORED
    ingest.committer.drain()
    instance_id = rows(catalog, select(Instance.id).where(Instance.sop_uid == m.sop_uid))[0][0]
    with catalog.unit(write=True) as uow:
        uow.session.add(IngestInFlight(instance_fk=instance_id, started_at=utcnow()))
        uow.commit()
    for site in (a, b):
        if site.name not in keep:
            for p in site.root.rglob(m.sop_uid + "*.dcm"):
                p.unlink()
    leftover.made = m
    return instance_id


class leftover:  # noqa: N801 - the object made by the last _in_flight_leftover
    made = None


def test_after_a_crash_in_flight_objects_are_resolved_from_the_sites(env):
    url, catalog, a, b, ingest, tmp = env
    both = _in_flight_leftover(env, "both.dcm", {"site-a", "site-b"})
    one = _in_flight_leftover(env, "one.dcm", {"site-b"})
    one_made = leftover.made
    none = _in_flight_leftover(env, "none.dcm", set())
    report = settle_in_flight(catalog, [a, b], older_than_s=0)
    # A copy the row calls ok is absent: the answer never went out (it waits for every
    # copy's outcome), so the rows go, as if the crash had come before the commit.
    assert (report.confirmed, report.removed) == (1, 2)
    assert rows(catalog, select(IngestInFlight)) == []
    states = {(i, loc): st for i, loc, st in rows(
        catalog, select(Copy.instance_fk, Copy.location, Copy.state))}
    assert states == {(both, "site-a"): "ok", (both, "site-b"): "ok"}
    assert [r[0] for r in rows(catalog, select(Instance.id))] == [both]
    assert not {one, none} & {r[0] for r in rows(catalog, select(Instance.id))}
    res = audit(url, {"site-a": a.root, "site-b": b.root})
    assert not res.bad and res.missing_copies == 0
    # The re-sent object takes up the file that did arrive: catalog and sites agree.
    assert ingest.store(req(one_made)).outcome is Outcome.STORED
    ingest.committer.drain()
    res = audit(url, {"site-a": a.root, "site-b": b.root})
    assert res.instances == 2 and res.ok_copies == 4 and not res.bad


def test_recent_marks_are_left_to_the_ingest_that_owns_them(env):
    url, catalog, a, b, ingest, tmp = env
    _in_flight_leftover(env, "x.dcm", set())
    report = settle_in_flight(catalog, [a, b], older_than_s=60)
    assert (report.confirmed, report.removed) == (0, 0)
    assert len(rows(catalog, select(IngestInFlight))) == 1


def test_an_unreachable_site_leaves_the_mark_for_a_later_pass(env, monkeypatch):
    url, catalog, a, b, ingest, tmp = env
    _in_flight_leftover(env, "x.dcm", set())

    def unreachable(key):  # noqa: ANN001, ANN202
        raise Unavailable("stat", "site-a", "mount gone")

    monkeypatch.setattr(a, "stat", unreachable)
    report = settle_in_flight(catalog, [a, b], older_than_s=0)
    assert (report.unreadable, report.removed) == (1, 0)
    assert len(rows(catalog, select(IngestInFlight))) == 1     # asked again next pass
    monkeypatch.undo()
    assert settle_in_flight(catalog, [a, b], older_than_s=0).removed == 1
