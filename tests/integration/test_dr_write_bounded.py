"""`dr write` of a study that lives only on the object tier: a large instance is read
from its bundle frame in bounded memory (through a scratch file), never held whole,
and comes back from the volume bit for bit."""
from __future__ import annotations

import hashlib
import json
import tracemalloc

from archive.app.compose import open_catalog, open_dr_writer
from tests.integration.test_dr import configure
from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series
from tests.support.tiering import Install, site_state

BIG = 24 * 1024 * 1024       # the segments are 128 KiB (configure)


def test_a_large_instance_from_a_bundle_is_written_in_bounded_memory(tmp_path):
    inst = Install.create(tmp_path / "pv")
    [big] = make_ct_series(tmp_path / "ct", 1, size=BIG, seed=4)
    inst.ingest([big])
    acked = {k: v for k, v in site_state(inst).items() if k.startswith("site-a/")}
    recipient = run_cli(inst.config, "dr", "keygen", "--out", str(tmp_path / "k")).stdout.strip()
    configure(inst, recipient)
    run_cli(inst.config, "migrate", "--study", big.study_uid)
    assert not site_state(inst)                  # online copies purged: only the bundle holds it

    settings = inst.settings
    writer = open_dr_writer(settings, open_catalog(settings), recipients=[recipient],
                            scratch=tmp_path / "scratch")
    tracemalloc.start()
    try:
        report = writer.run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.instances == 1 and report.bytes > BIG - (1 << 20), report.to_json()
    # Segment buffers (a few times 128 KiB) and zstd's, not the 24 MiB instance.
    assert peak < BIG // 3, peak
    assert not list((tmp_path / "scratch").iterdir())     # the scratch copy is removed

    out = tmp_path / "out"
    p = run_cli(inst.config, "restore", "--study", big.study_uid, "--to", str(out), "--from",
                "dr", "--identity", str(tmp_path / "k"), "--json", check=False)
    assert json.loads(p.stdout)["restored"] == 1, p.stdout + p.stderr
    [dcm] = out.rglob("*.dcm")
    assert [hashlib.sha256(dcm.read_bytes()).hexdigest()] == list(acked.values())
