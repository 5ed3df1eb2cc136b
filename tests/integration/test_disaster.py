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
    study = pushed.made[0].study_uid
    before = cli(pushed, "restore", "--study", study, "--to", str(tmp_path / "earlier"))
    assert before["restored"] > 0                                # a later access, audited
    assert cli(pushed, "dr", "write")["complete"]
    dr_backup = [v for k, v in cli(pushed, "status")["catalog_backups"].items()
                 if k.startswith("dr:")]
    assert dr_backup and dr_backup[0]["age_s"] < 600             # status shows it per place
    vault = tmp_path / "vault"                                   # what was offsite
    shutil.copytree(pushed.config.parent / "dr" / "volumes", vault)
    shutil.rmtree(pushed.config.parent)                          # catalog, sites, tier, keys: gone
    new = Install.create(tmp_path / "new")
    vols = sorted(str(p) for p in vault.glob("*.tar"))
    r = cli(new, "dr", "rebuild-catalog", "--identity", str(pushed.key), *reversed(vols))
    assert r["ok"] and r["studies_complete"] == len({m.study_uid for m in pushed.made})
    merged = r["catalog_backup"]
    assert merged["applied"] and merged["audit_key"] and merged["taken_at"]
    # The backup named both old sites' copies: none is on the new disks.
    assert merged["absent"] == {"site-a": len(pushed.acked), "site-b": len(pushed.acked)}
    assert merged["added_from_volumes"] == 0                     # the backup had them all
    # The audit trail came back: the original receive and the later restore of the study,
    # and the whole chain verifies under the audit key that came back with it.
    trail = cli(new, "audit", "--study", study)["records"]
    actions = [t["action"] for t in trail]
    assert "object-received" in actions and "restore" in actions, actions
    received = next(t for t in trail if t["action"] == "object-received")
    assert received["actor"] == "STORESCU" and received["patient_id"] == "TEST-0001"
    verified = cli(new, "audit", "--verify")
    assert verified["ok"] and verified["records"] >= len(trail) + 2, verified
    out = tmp_path / "restored"
    r = cli(new, "restore", "--patient", "TEST-0001", "--to", str(out),
            "--identity", str(pushed.key), *[a for v in vols for a in ("--volume", v)])
    assert r["restored"] == len(pushed.acked) and r["by_source"] == {"dr": len(pushed.acked)}
    assert sums(out) == pushed.acked                             # every acknowledged instance
    # And back online on the new install's sites.
    r = cli(new, "restore", "--patient", "TEST-0001", "--online", "--identity", str(pushed.key))
    assert r["restored"] == len(pushed.acked)
    assert cli(new, "scrub", "--all")["ok"]
    assert cli(new, "audit", "--verify")["ok"]


def test_a_rebuild_without_the_catalog_backup_keeps_to_the_volumes_rows(pushed, tmp_path):
    """Volumes written before they carried a backup, or --no-catalog-backup: the images'
    rows still come back; the report says that no backup was put back."""
    assert cli(pushed, "dr", "write")["complete"]
    vols = sorted(str(p) for p in (pushed.config.parent / "dr" / "volumes").glob("*.tar"))
    new = Install.create(tmp_path / "new")
    r = cli(new, "dr", "rebuild-catalog", "--identity", str(pushed.key), "--no-catalog-backup",
            *vols)
    assert r["ok"] and r["catalog_backup"] == {"applied": None, "reason": "--no-catalog-backup"}
    assert not [t for t in cli(new, "audit", "--study", pushed.made[0].study_uid)["records"]
                if t["action"] == "object-received"]
    # Into a catalog that already holds studies, a backup is never put back.
    r = cli(pushed, "dr", "rebuild-catalog", "--identity", str(pushed.key), *vols)
    assert r["catalog_backup"]["applied"] is None and "already holds" in \
        r["catalog_backup"]["reason"]


def test_a_backup_on_an_unsigned_volume_is_never_put_back(pushed, tmp_path):
    """A volume cut short loses its signature: with --trust-unsigned its segments'
    rows are imported (checked), but its catalog backup (accounts, the audit trail)
    is not put back: nobody can tell who wrote it."""
    assert cli(pushed, "dr", "write")["complete"]
    vol = sorted((pushed.config.parent / "dr" / "volumes").glob("*.tar"))[0]
    cut = tmp_path / vol.name
    cut.write_bytes(vol.read_bytes()[:vol.stat().st_size * 2 // 3])
    new = Install.create(tmp_path / "new")
    r = cli(new, "dr", "rebuild-catalog", "--identity", str(pushed.key), "--trust-unsigned",
            str(cut), ok=False)
    assert r["_rc"] == 1 and r["studies"] >= 1                   # rows from the segments
    assert r["catalog_backup"]["applied"] is None and "not signed" in \
        r["catalog_backup"]["reason"]
    assert not cli(new, "audit", "--study", pushed.made[0].study_uid)["records"]
