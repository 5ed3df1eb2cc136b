"""Restore reads DR members through the reader's bounded decryption: a member that
decompresses to more than the limit is refused, by name, and nothing is delivered
(an unbounded restore would hold it all in memory). The limit is lowered in this
process so that an ordinary small volume is over it."""
from __future__ import annotations

import json
import shutil

from archive.app.compose import open_catalog, open_restorer
from dr import reader
from dr.deliver import DirDelivery
from dr.keys import load_identities
from dr.restore import Selection, select_studies
from tests.integration.test_dr import configure
from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series
from tests.support.tiering import Install


def test_a_member_over_the_limit_is_refused_and_nothing_is_delivered(tmp_path, monkeypatch):
    inst = Install.create(tmp_path / "pv")
    ct = make_ct_series(tmp_path / "ct", 3, size=40_000)
    inst.ingest(ct)
    key = tmp_path / "dr-key.txt"
    configure(inst, run_cli(inst.config, "dr", "keygen", "--out", str(key)).stdout.strip())
    assert json.loads(run_cli(inst.config, "dr", "write", "--json").stdout)["complete"]
    for s in inst.settings.sites:                  # only the DR volume holds the study now
        shutil.rmtree(s.path / "objects")
        (s.path / "objects").mkdir()
    monkeypatch.setattr(reader, "MAX_PLAIN", 64 * 1024)    # each segment holds ~120 kB

    settings = inst.settings
    catalog = open_catalog(settings)
    out = tmp_path / "out"
    restorer = open_restorer(settings, catalog, DirDelivery(out), sources=("dr",),
                             identities=load_identities([key]), scratch=tmp_path / "scratch")
    report = restorer.run(select_studies(catalog, Selection(studies=(ct[0].study_uid,))))

    assert report.restored == 0 and len(report.failures) == len(ct)
    assert all("decompresses to more than" in f["reason"] for f in report.failures), \
        report.failures
    assert not list(out.rglob("*.dcm"))
