"""`pacsvault serve` with its catalog on a real PostgreSQL server, fed by dcmtk storescu.

The production configuration: worker processes sharing the DICOM port, each with
its own connection pool to PostgreSQL. Every copy is audited against the catalog
afterwards, and `status --json` must agree with it.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import require_tool, site_paths
from tests.support import pg
from tests.support.daemon import Daemon, free_port, init_instance, run_cli, storescu
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.verify import audit

pytestmark = [pytest.mark.needs_pg, pytest.mark.needs_dcmtk, pytest.mark.timeout(300)]


@pytest.fixture
def pg_daemon(pg_server: pg.PgServer, tmp_path: Path) -> Iterator[tuple[Daemon, str]]:
    require_tool("storescu")
    url = pg_server.create_database()
    cfg = init_instance(tmp_path / "pv", catalog_url=url)
    assert "postgresql" in cfg.read_text()
    run_cli(cfg, "peer", "add", "STORESCU", "127.0.0.1")
    run_cli(cfg, "peer", "add", "SECOND", "127.0.0.1")
    d = Daemon(cfg, free_port(), free_port(), workers=2)
    d.start()
    yield d, url
    if d.proc and d.proc.poll() is None:
        d.kill9()
    try:
        pg_server.drop_database(url)
    except Exception:
        pass


def test_serve_on_postgres_stores_and_audits(pg_daemon, tmp_path: Path) -> None:
    daemon, url = pg_daemon
    made = make_varied_study(tmp_path / "in", per_kind=2, size=6000)
    r = storescu(daemon.dicom_port, tmp_path / "in")
    assert r.returncode == 0, r.stderr

    sites = site_paths(daemon.config)
    a = audit(url, sites)
    assert a.instances == len(made)
    assert a.ok_copies == 2 * len(made) and a.missing_copies == 0
    assert not a.bad and not a.temp_files
    assert a.sop_uids == {m.sop_uid for m in made}

    # The rows really are in PostgreSQL (not in the SQLite file `init` wrote first).
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM instances")).scalar() == len(made)
            assert c.execute(text("SELECT count(*) FROM studies")).scalar() == 1
            assert c.execute(text("SELECT count(DISTINCT series_fk) FROM instances")).scalar() \
                == len({m.series_uid for m in made})
    finally:
        engine.dispose()

    st = daemon.status()
    assert st["catalog"] == "postgresql+psycopg"
    assert (st["instances"], st["studies"], st["conflicts"], st["under_replicated"]) == (
        len(made), 1, 0, 0)
    assert st["healthy"] is True
    assert st["bytes"] == sum(p.stat().st_size for p in sites["site-a"].rglob("*.dcm"))
    for s in st["sites"]:
        assert (s["objects"], s["studies"], s["missing"], s["corrupt"]) == (len(made), 1, 0, 0)

    # Sent again: acknowledged as duplicates, nothing new in the catalog.
    assert storescu(daemon.dicom_port, tmp_path / "in").returncode == 0
    assert daemon.status()["instances"] == len(made)
    assert daemon.stop() == 0


def test_two_peers_push_one_study_at_once(pg_daemon, tmp_path: Path) -> None:
    """Two associations (two worker processes) create the same new study concurrently."""
    daemon, url = pg_daemon
    first = make_ct_series(tmp_path / "one", 15, size=16 * 1024, seed=3)
    make_ct_series(tmp_path / "two", 15, size=16 * 1024, seed=4,
                   study_uid=first[0].study_uid)
    results: dict[str, int] = {}

    def push(aet: str, d: Path) -> None:
        results[aet] = storescu(daemon.dicom_port, d, aet=aet).returncode

    threads = [threading.Thread(target=push, args=("STORESCU", tmp_path / "one")),
               threading.Thread(target=push, args=("SECOND", tmp_path / "two"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert results == {"STORESCU": 0, "SECOND": 0}
    a = audit(url, site_paths(daemon.config))
    assert a.instances == 30 and a.ok_copies == 60 and not a.bad and not a.temp_files
    st = daemon.status()
    assert (st["instances"], st["studies"]) == (30, 1)
    assert daemon.stop() == 0
