"""Ingest in-process: real sites, real SQLite catalog, injected site failures."""
from pathlib import Path

import pytest

from archive.app.ingest import IngestService, Outcome, StoreRequest
from archive.catalog.engine import make_engine, upgrade
from archive.catalog.uow import Catalog
from replication.mirror import MirrorWriter
from replication.repair import repair_missing
from tests.support.dataset import make_instance, write_raw_part10
from tests.support.verify import audit
from tiers.backend import Unavailable
from tiers.fs import MARKER, FilesystemBackend


class FailingSite(FilesystemBackend):
    """A site whose writes fail while ``down`` is set (a fault wrapper)."""
    down = False

    def put(self, key, payload, *, replace=False):
        if self.down:
            raise Unavailable("put", self.name, "injected")
        return super().put(key, payload, replace=replace)


@pytest.fixture
def env(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/c.db"
    engine = make_engine(url)
    upgrade(engine)
    catalog = Catalog(engine)
    a = FailingSite("site-a", tmp_path / "a")
    b = FailingSite("site-b", tmp_path / "b")
    a.initialize(), b.initialize()
    mirror = MirrorWriter([a, b], timeout_s=10, retry_after_s=0)
    yield url, catalog, a, b, IngestService(catalog, mirror), tmp_path
    mirror.close()
    catalog.close()


def req(made, ae="TEST"):
    return StoreRequest(made.path, made.sop_class, made.sop_uid, made.transfer_syntax, ae)


def test_store_duplicate_and_conflict(env):
    url, catalog, a, b, ingest, tmp = env
    m1 = make_instance(tmp / "1.dcm", size=2000)
    assert ingest.store(req(m1)).outcome is Outcome.STORED
    assert ingest.store(req(m1)).outcome is Outcome.DUPLICATE
    m2 = make_instance(tmp / "2.dcm", size=3000, study_uid=m1.study_uid,
                       series_uid=m1.series_uid, sop_uid=m1.sop_uid)
    r = ingest.store(req(m2))
    assert r.outcome is Outcome.STORED and r.conflict
    res = audit(url, {"site-a": a.root, "site-b": b.root})
    assert res.instances == 2 and res.ok_copies == 4 and not res.bad
    files = sorted(p.name for p in a.root.rglob("*.dcm"))
    assert len(files) == 2 and files[0] != files[1]


def test_one_site_down_then_repaired(env):
    url, catalog, a, b, ingest, tmp = env
    b.down = True
    made = [make_instance(tmp / f"{i}.dcm", size=1000) for i in range(5)]
    for m in made:
        r = ingest.store(req(m))
        assert r.outcome is Outcome.STORED and r.missing_sites == ["site-b"]
    res = audit(url, {"site-a": a.root, "site-b": b.root})
    assert res.missing_copies == 5 and res.ok_copies == 5 and not res.bad
    b.down = False
    rep = repair_missing(catalog, [a, b], tmp / "scratch")
    assert rep.repaired == 5
    res = audit(url, {"site-a": a.root, "site-b": b.root})
    assert res.missing_copies == 0 and res.ok_copies == 10 and not res.bad


def test_no_site_means_no_ack_and_no_row(env):
    url, catalog, a, b, ingest, tmp = env
    a.down = b.down = True
    r = ingest.store(req(make_instance(tmp / "x.dcm")))
    assert r.outcome is Outcome.NO_COPY and not r.acknowledged
    assert audit(url, {"site-a": a.root, "site-b": b.root}).instances == 0


def test_repair_never_copies_a_corrupt_source(env):
    url, catalog, a, b, ingest, tmp = env
    b.down = True
    m = make_instance(tmp / "x.dcm", size=5000)
    ingest.store(req(m))
    b.down = False
    victim = next(a.root.rglob("*.dcm"))
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    rep = repair_missing(catalog, [a, b], tmp / "scratch")
    assert rep.repaired == 0
    assert not list(b.root.rglob("*.dcm"))


def test_invalid_objects_refused_without_files(env):
    url, catalog, a, b, ingest, tmp = env
    bad = write_raw_part10(tmp / "bad.dcm", "1.2.840.10008.5.1.4.1.1.2", "1.2.3",
                           "1.2.840.10008.1.2.1", b"\x08\x00\x18\x00UI\xff\x7fgarbage")
    r = ingest.store(StoreRequest(bad, "1.2.840.10008.5.1.4.1.1.2", "1.2.3",
                                  "1.2.840.10008.1.2.1", "T"))
    assert r.outcome is Outcome.INVALID
    m = make_instance(tmp / "m.dcm")
    r = ingest.store(StoreRequest(m.path, "1.2.840.10008.5.1.4.1.1.4", m.sop_uid,
                                  m.transfer_syntax, "T"))
    assert r.outcome is Outcome.MISMATCH
    r = ingest.store(StoreRequest(m.path, m.sop_class, "1.2.999", m.transfer_syntax, "T"))
    assert r.outcome is Outcome.MISMATCH
    assert not list(a.root.rglob("*.dcm")) and not list(b.root.rglob("*.dcm"))
    assert (a.root / MARKER).exists()


def test_group_commit_batches_and_isolates_failures(tmp_path):
    import threading

    from sqlalchemy import text

    from archive.catalog.group_commit import GroupCommitter

    engine = make_engine(f"sqlite:///{tmp_path}/g.db")
    upgrade(engine)
    gc = GroupCommitter(Catalog(engine))
    results, errors = [], []

    def job(i):
        def work(tx):
            if i == 3:
                tx.cur.execute("INSERT INTO no_such_table VALUES (1)")
            tx.cur.execute("INSERT INTO peers (ae_title, host, port, created_at) "
                           "VALUES (?, 'h', NULL, '2024-01-01')", (f"AE{i}",))
            return i
        try:
            results.append(gc.run(work))
        except Exception as e:
            errors.append((i, type(e).__name__))

    threads = [threading.Thread(target=job, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.close()
    assert sorted(results) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert [i for i, _ in errors] == [3]
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM peers")).scalar() == 9


def test_an_idle_repair_pass_writes_nothing(env):
    # The daemon runs a repair pass every few seconds; with nothing to repair it must not
    # create its scratch directory (a hostile-input test counts every new path).
    url, catalog, a, b, ingest, tmp = env
    ingest.store(req(make_instance(tmp / "x.dcm")))
    rep = repair_missing(catalog, [a, b], tmp / "scratch")
    assert rep.repaired == 0 and not (tmp / "scratch").exists()


def test_a_data_set_in_memory_is_stored_exactly_as_one_from_a_spool_file(env):
    """The engine hands small data sets over in memory: the same object either way
    is the same stored bytes (a re-send from memory is a duplicate, not a conflict)."""
    url, catalog, a, b, ingest, tmp = env
    m = make_instance(tmp / "m.dcm", size=5000)
    image = m.path.read_bytes()
    in_memory = StoreRequest(None, m.sop_class, m.sop_uid, m.transfer_syntax, "T", data=image)
    r = ingest.store(in_memory)
    assert r.outcome is Outcome.STORED
    assert ingest.store(req(m)).outcome is Outcome.DUPLICATE
    res = audit(url, {"site-a": a.root, "site-b": b.root})
    assert res.instances == 1 and res.ok_copies == 2 and not res.bad
    stored = next(a.root.rglob("*.dcm")).read_bytes()
    assert stored.endswith(image[len(image) - 5000:])
    bad = StoreRequest(None, m.sop_class, m.sop_uid, m.transfer_syntax, "T",
                       data=image[:-100])    # cut inside the pixel data
    assert ingest.store(bad).outcome is Outcome.INVALID


def test_deferred_work_rides_the_next_batch_or_is_committed_on_its_own_soon(tmp_path: Path):
    """Ingest's settle step costs no flush of its own when objects keep coming, and is
    still committed within defer_s when none comes."""
    import time

    from sqlalchemy import text

    from archive.catalog.group_commit import GroupCommitter

    engine = make_engine(f"sqlite:///{tmp_path}/g.db")
    upgrade(engine)
    gc = GroupCommitter(Catalog(engine), defer_s=0.3)
    commits = []
    real = gc._commit
    gc._commit = lambda batch: (commits.append(len(batch)), real(batch))[1]

    def peer(name):
        return lambda tx: tx.cur.execute(
            "INSERT INTO peers (ae_title, host, port, created_at) VALUES (?, 'h', NULL, "
            "'2024-01-01')", (name,))

    def count():
        with engine.connect() as c:
            return c.execute(text("SELECT count(*) FROM peers")).scalar()

    gc.submit(peer("DEFERRED1"))
    gc.run(peer("NEXT"))                 # one commit holds both
    assert commits == [2] and count() == 2
    gc.submit(peer("ALONE"))
    time.sleep(0.1)
    assert count() == 2                  # still waiting for company
    deadline = time.monotonic() + 3
    while count() < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert count() == 3 and commits == [2, 1]
    gc.submit(peer("AT-CLOSE"))
    gc.close()                           # nothing submitted is dropped at shutdown
    assert count() == 4


def test_ingest_writes_what_c_find_matches(env):
    """The query attributes are filled at ingest ('' when absent, never NULL, which
    means 'not read yet' to the backfill)."""
    from sqlalchemy import text

    url, catalog, a, b, ingest, tmp = env
    m = make_instance(tmp / "q.dcm", size=2000, raw_overrides={
        "PatientName": "Müller^Hans", "StudyID": "S-17", "ReferringPhysicianName": "Smith^Anne",
        "SeriesDescription": "AX T1", "SeriesDate": "20240102", "SeriesTime": "101500",
        "InstanceNumber": "7", "SpecificCharacterSet": "ISO_IR 100"})
    bare = make_instance(tmp / "bare.dcm", size=2000)
    for x in (m, bare):
        assert ingest.store(req(x)).outcome is Outcome.STORED
    with catalog.engine.connect() as c:
        row = c.execute(text(
            "SELECT p.name_fold, st.study_id, st.referring_physician, "
            "st.referring_physician_fold, se.series_description, se.series_date, "
            "se.series_time, i.instance_number FROM instances i "
            "JOIN series se ON se.id = i.series_fk JOIN studies st ON st.id = i.study_fk "
            "JOIN patients p ON p.id = st.patient_fk WHERE i.sop_uid = :u"),
            {"u": m.sop_uid}).one()
        empty = c.execute(text(
            "SELECT st.study_id, st.referring_physician_fold, se.series_description, "
            "i.instance_number FROM instances i JOIN series se ON se.id = i.series_fk "
            "JOIN studies st ON st.id = i.study_fk WHERE i.sop_uid = :u"),
            {"u": bare.sop_uid}).one()
    from archive.dicom.pn import fold

    assert tuple(row) == (fold("Müller^Hans"), "S-17", "Smith^Anne", fold("Smith^Anne"),
                          "AX T1", "20240102", "101500", "7")
    assert fold("Müller^Hans") == fold("MÜLLER^HANS") != "Müller^Hans"
    assert tuple(empty) == ("", "", "", "1")      # make_instance always sets InstanceNumber 1
