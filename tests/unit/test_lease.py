"""Catalog leases: one holder at a time, expiry, takeover from a killed holder."""
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from archive.catalog import lease
from archive.catalog.engine import make_engine, upgrade
from archive.catalog.uow import Catalog


@pytest.fixture
def catalog(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/c.db")
    upgrade(engine)
    c = Catalog(engine)
    yield c
    c.close()


def test_one_holder_at_a_time_and_release(catalog):
    a, b = lease.new_holder(), lease.new_holder()
    assert lease.try_acquire(catalog, "job:x", a, 60)
    assert lease.try_acquire(catalog, "job:x", a, 60)          # renewal
    assert not lease.try_acquire(catalog, "job:x", b, 60)
    lease.release(catalog, "job:x", a)
    assert lease.try_acquire(catalog, "job:x", b, 60)


def test_expired_lease_is_taken_over(catalog):
    t = [datetime(2026, 1, 1, tzinfo=timezone.utc)]
    clock = lambda: t[0]  # noqa: E731
    assert lease.try_acquire(catalog, "s", "remote-host:1:aa", 60, clock)
    t[0] += timedelta(seconds=30)
    assert not lease.try_acquire(catalog, "s", "remote-host:2:bb", 60, clock)
    t[0] += timedelta(seconds=31)
    assert lease.try_acquire(catalog, "s", "remote-host:2:bb", 60, clock)


def test_a_killed_local_holder_does_not_block(catalog):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    import socket
    dead = f"{socket.gethostname()[:64]}:{p.pid}:dead"
    assert lease.try_acquire(catalog, "s", dead, 3600)
    assert lease.try_acquire(catalog, "s", lease.new_holder(), 60)


def test_context_manager_raises_when_busy(catalog):
    with lease.lease(catalog, "study:1.2", what="study x"):
        with pytest.raises(lease.LeaseHeld, match="study x is busy"):
            with lease.lease(catalog, "study:1.2", what="study x", wait_s=0.2):
                pass
    with lease.lease(catalog, "study:1.2", what="study x"):
        pass
