"""The three disaster scenarios of docs/operations/restore.md, end to end, on data
pushed by dcmtk storescu to `pacsvault serve`: after each, every acknowledged
instance comes back bit-identical (SHA-256), counted and asserted."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.integration.test_dr import configure
from tests.support.daemon import run_cli, storescu
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.tiering import Install

pytestmark = pytest.mark.needs_dcmtk


def sums(root: Path) -> dict[str, str]:
    return {p.name[:-4]: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.dcm")}


@pytest.fixture
def pushed(daemon, tmp_path):
    """Studies of many kinds pushed by storescu and acknowledged; a DR key; then the
    daemon is stopped (the disasters happen to the data, not to the process)."""
    made = (make_varied_study(tmp_path / "in" / "v", per_kind=2, size=20_000)
            + make_ct_series(tmp_path / "in" / "ct", 10, size=60_000)
            + make_ct_series(tmp_path / "in" / "big", 1, size=3_000_000, seed=7))
    r = storescu(daemon.dicom_port, tmp_path / "in")
    assert r.returncode == 0, r.stderr
    assert daemon.stop() == 0
    inst = Install(daemon.config)
    inst.made = made
    inst.acked = sums(inst.settings.sites[0].path / "objects")
    assert len(inst.acked) == len(made)                          # every one acknowledged
    assert sums(inst.settings.sites[1].path / "objects") == inst.acked
    inst.key = tmp_path / "dr-identity.txt"
    configure(inst, run_cli(inst.config, "dr", "keygen", "--out", str(inst.key)).stdout.strip())
    return inst


def cli(inst: Install, *args: str, ok: bool = True) -> dict:
    p = run_cli(inst.config, *args, "--json", check=False)
    out = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    if ok:
        assert p.returncode == 0, (args, p.stderr)
    return {**out, "_rc": p.returncode, "_stderr": p.stderr}


def test_scenario_1_one_site_lost_is_rebuilt_from_its_mirror(pushed):
    site_b = pushed.settings.sites[1].path
    shutil.rmtree(site_b)
    site_b.mkdir()                                              # the new, empty disk
    r = cli(pushed, "replicate", "--rebuild", "site-b", "--initialize")
    assert r["verified"] == r["expected"] == len(pushed.acked)
    assert sums(site_b / "objects") == pushed.acked             # counted and bit-identical
    assert cli(pushed, "scrub", "--all")["ok"]


def test_scenario_2_both_sites_lost_restore_from_object_tier_and_dr(pushed, tmp_path):
    old_study = pushed.made[0].study_uid                        # the varied study moved to S3
    cli(pushed, "migrate", "--study", old_study)
    assert cli(pushed, "dr", "write")["complete"]
    for s in pushed.settings.sites:                             # both buildings lost
        shutil.rmtree(s.path)
        s.path.mkdir()
    for name in ("site-a", "site-b"):                           # new disks: what the tier has
        r = cli(pushed, "replicate", "--rebuild", name, "--initialize", ok=False)
        assert r["_rc"] == 1 and r["unrecoverable"]             # the rest is on DR only
    r = cli(pushed, "restore", "--patient", "TEST-0001", "--online",
            "--identity", str(pushed.key))
    assert r["by_source"].get("dr", 0) == len(pushed.acked) - sum(
        1 for m in pushed.made if m.study_uid == old_study)
    assert cli(pushed, "scrub", "--all")["ok"]                   # both sites whole again
    out = tmp_path / "check"
    r = cli(pushed, "restore", "--patient", "TEST-0001", "--to", str(out))
    assert r["restored"] == len(pushed.acked)
    assert r["by_source"] == {"online": len(pushed.acked) - r["by_source"].get("objects", 0),
                              **({"objects": r["by_source"]["objects"]}
                                 if "objects" in r["by_source"] else {})}
    assert sums(out) == pushed.acked


def test_scenario_3_only_the_dr_volumes_and_the_key_survive(pushed, tmp_path):
    assert cli(pushed, "dr", "write")["complete"]
    vault = tmp_path / "vault"                                   # what was offsite
    shutil.copytree(pushed.config.parent / "dr" / "volumes", vault)
    shutil.rmtree(pushed.config.parent)                          # catalog, sites, tier: gone
    new = Install.create(tmp_path / "new")
    vols = sorted(str(p) for p in vault.glob("*.tar"))
    r = cli(new, "dr", "rebuild-catalog", "--identity", str(pushed.key), *reversed(vols))
    assert r["ok"] and r["studies_complete"] == len({m.study_uid for m in pushed.made})
    out = tmp_path / "restored"
    r = cli(new, "restore", "--patient", "TEST-0001", "--to", str(out),
            "--identity", str(pushed.key), *[a for v in vols for a in ("--volume", v)])
    assert r["restored"] == len(pushed.acked) and r["by_source"] == {"dr": len(pushed.acked)}
    assert sums(out) == pushed.acked                             # every acknowledged instance
    # And back online on the new install's sites.
    r = cli(new, "restore", "--patient", "TEST-0001", "--online", "--identity", str(pushed.key))
    assert r["restored"] == len(pushed.acked)
    assert cli(new, "scrub", "--all")["ok"]
