"""The online read-ahead of a restore (dr/restore.py): bounded in items and bytes of
scratch, in order, and nothing left in scratch when the delivery fails mid-way."""
from __future__ import annotations

import time

import pytest

from archive.app.compose import open_catalog
from dr import restore as R
from tests.support.dataset import make_ct_series
from tests.support.tiering import Install


class Counting:
    name = "test"

    def __init__(self, scratch, fail_at: int | None = None, slow: float = 0.01) -> None:
        self.scratch, self.fail_at, self.slow = scratch, fail_at, slow
        self.seen: list[str] = []
        self.most_in_scratch = 0

    def done(self, item) -> bool:  # noqa: ANN001
        return False

    def deliver(self, item, path) -> None:  # noqa: ANN001
        self.most_in_scratch = max(self.most_in_scratch, len(list(self.scratch.iterdir())))
        self.seen.append(item.inst.sop_uid)
        time.sleep(self.slow)            # a slow destination: the reader runs ahead
        path.unlink()
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise RuntimeError("the destination went away")

    def close(self) -> None:
        pass


@pytest.fixture
def inst(tmp_path):
    inst = Install.create(tmp_path / "pv")
    inst.made = make_ct_series(tmp_path / "ct", 40, size=20_000)
    inst.ingest(inst.made)
    return inst


def the_study(r) -> tuple[int, str]:  # noqa: ANN001
    from archive.catalog.models import Study
    with r.catalog.unit() as uow:
        s = uow.session.query(Study).one()
        return s.id, s.study_uid


def restorer(inst, delivery, scratch):  # noqa: ANN001, ANN201
    return R.Restorer(open_catalog(inst.settings), inst.sites(), None, delivery,
                      sources=("online",), scratch=scratch)


def test_read_ahead_is_bounded_and_in_order(inst, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "READ_AHEAD", 3)
    scratch = tmp_path / "scratch"
    d = Counting(scratch)
    r = restorer(inst, d, scratch)
    study = the_study(r)
    report = r.run([study])
    assert report.ok and report.restored == 40
    assert 1 <= d.most_in_scratch <= 3 + 1          # the window, and the one being delivered
    assert sorted(d.seen) == sorted(m.sop_uid for m in inst.made)
    assert list(scratch.iterdir()) == []


def test_bytes_bound_lets_one_big_item_through(inst, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "READ_AHEAD_BYTES", 1)    # smaller than any instance
    scratch = tmp_path / "scratch"
    d = Counting(scratch)
    r = restorer(inst, d, scratch)
    study = the_study(r)
    assert r.run([study]).restored == 40
    assert d.most_in_scratch <= 2


def test_a_failing_delivery_leaves_nothing_in_scratch(inst, tmp_path):
    scratch = tmp_path / "scratch"
    d = Counting(scratch, fail_at=5)
    r = restorer(inst, d, scratch)
    study = the_study(r)
    with pytest.raises(RuntimeError):
        r.run([study])
    assert len(d.seen) == 5
    assert list(scratch.iterdir()) == []               # read ahead, never delivered: removed
