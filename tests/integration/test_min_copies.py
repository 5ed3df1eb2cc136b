"""[ingest] min_copies: how many verified copies an acknowledgement needs.

1 (the default): with a site gone the object is accepted on the healthy one and
marked under-replicated. 2: with a site gone C-STORE answers Out of Resources
(0xA700) and the catalog gets no row. Real daemon, real storescu, a site taken
away by removing its marker (as an unmounted NAS looks).
"""
from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from tests.conftest import require_tool
from tests.support.daemon import Daemon, free_port, init_instance, run_cli, storescu
from tests.support.dataset import make_instance


def instance_rows(cfg: Path) -> int:
    with sqlite3.connect(cfg.parent / "catalog" / "catalog.db") as c:
        return c.execute("select count(*) from instances").fetchone()[0]


def set_min_copies(cfg: Path, n: int) -> None:
    """Set [ingest] min_copies whether or not the config already names it."""
    text = cfg.read_text()
    text, found = re.subn(r"^min_copies = .*$", f"min_copies = {n}", text, count=1, flags=re.M)
    if not found:
        text = text.replace("[ingest]\n", f"[ingest]\nmin_copies = {n}\n", 1)
    cfg.write_text(text)


def push_with_site_b_gone(tmp_path: Path, min_copies: int | None):
    require_tool("storescu")
    cfg = init_instance(tmp_path / "pv")
    if min_copies:
        set_min_copies(cfg, min_copies)
    run_cli(cfg, "peer", "add", "STORESCU", "127.0.0.1")
    marker = cfg.parent / "sites" / "b" / "PACSVAULT-SITE.json"
    marker.rename(marker.with_suffix(".away"))
    made = make_instance(tmp_path / "one.dcm")
    d = Daemon(cfg, free_port(), free_port(), workers=1).start()
    try:
        r = storescu(d.dicom_port, made.path, extra=("-v",))
        assert d.stop() == 0
    finally:
        d.kill9()
    return cfg, r, d


def test_default_one_copy_acknowledges_under_replicated(tmp_path: Path) -> None:
    cfg, r, _ = push_with_site_b_gone(tmp_path, None)
    assert r.returncode == 0, r.stderr
    assert instance_rows(cfg) == 1
    st = run_cli(cfg, "status", "--json").stdout
    assert '"under_replicated": 1' in st


def test_two_copies_required_refuses_with_out_of_resources(tmp_path: Path) -> None:
    cfg, r, d = push_with_site_b_gone(tmp_path, 2)
    assert "Refused: OutOfResources" in r.stdout + r.stderr, r.stdout + r.stderr
    assert instance_rows(cfg) == 0
    assert "min_copies" in d.log()


def test_min_copies_above_the_number_of_sites_is_refused(tmp_path: Path) -> None:
    cfg = init_instance(tmp_path / "pv")
    set_min_copies(cfg, 3)
    p = run_cli(cfg, "status", check=False)
    assert p.returncode == 3 and "ingest.min_copies" in p.stderr, p.stderr
