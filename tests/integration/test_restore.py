"""`pacsvault restore`: from the fastest tier holding a verified copy, to a directory,
a PACS (a real Orthanc) or the online sites; with damaged copies, a missing volume,
and an interruption."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.integration.test_dr import configure, db, volumes_of
from tests.support.daemon import run_cli
from tests.support.dataset import make_conflict, make_ct_series, make_varied_study
from tests.support.tiering import Install, site_state


@pytest.fixture
def inst(tmp_path):
    i = Install.create(tmp_path / "pv")
    i.varied = make_varied_study(tmp_path / "v", per_kind=1, size=30_000)
    i.ct = make_ct_series(tmp_path / "ct", 6, size=40_000)
    i.big = make_ct_series(tmp_path / "big", 1, size=300_000, seed=9, study_uid=i.ct[0].study_uid)
    i.ingest(i.varied + i.ct + i.big)
    i.key = tmp_path / "dr-key.txt"
    i.recipient = run_cli(i.config, "dr", "keygen", "--out", str(i.key)).stdout.strip()
    configure(i, i.recipient)
    i.acked = {Path(k).name[:-4]: v for k, v in site_state(i).items() if k.startswith("site-a/")}
    return i


def restore(inst: Install, *args: str, env: dict | None = None) -> dict:
    p = run_cli(inst.config, "restore", *args, "--json", check=False, env=env)
    out = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    return {**out, "_rc": p.returncode, "_stderr": p.stderr}


def tree(root: Path) -> dict[str, str]:
    """SOP UID -> SHA-256 of every .dcm under root."""
    return {p.name[:-4]: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.dcm")}


def lose_online(inst: Install) -> None:
    for s in inst.settings.sites:
        shutil.rmtree(s.path / "objects")
        (s.path / "objects").mkdir()


def test_restore_to_a_directory_from_online_is_bit_identical_and_resumable(inst, tmp_path):
    study = inst.ct[0].study_uid
    out = tmp_path / "out"
    r = restore(inst, "--study", study, "--to", str(out))
    n = len(inst.ct) + 1
    assert r["_rc"] == 0 and r["restored"] == n and r["by_source"] == {"online": n}
    got = tree(out)
    assert got == {k: v for k, v in inst.acked.items() if k in got} and len(got) == n
    assert all(p.parent.parent.name == study for p in out.rglob("*.dcm"))   # <study>/<series>/
    assert not (out / ".pacsvault-restore").exists()
    again = restore(inst, "--study", study, "--to", str(out))
    assert again["_rc"] == 0 and again["already_there"] == n and again["restored"] == 0
    # Selection by patient, accession and date range.
    r = restore(inst, "--patient", "TEST-0001", "--from-date", "20000101", "--to-date",
                "20991231", "--to", str(tmp_path / "all"))
    assert r["_rc"] == 0 and r["instances"] == len(inst.acked) and tree(tmp_path / "all") == inst.acked


def test_a_corrupt_copy_falls_through_to_the_next_tier(inst, tmp_path):
    text = inst.config.read_text().replace("purge_online = true", "purge_online = false")
    inst.config.write_text(text)
    study = inst.varied[0].study_uid
    run_cli(inst.config, "migrate", "--study", study)           # bundle, online copies kept
    victim = inst.varied[1].sop_uid
    for s in inst.settings.sites:                               # both online copies rot
        [p] = (s.path / "objects").rglob(f"{victim}.dcm")
        raw = bytearray(p.read_bytes())
        raw[-50] ^= 0xFF
        p.write_bytes(bytes(raw))
    r = restore(inst, "--study", study, "--to", str(tmp_path / "out"))
    assert r["_rc"] == 0 and r["by_source"] == {"online": len(inst.varied) - 1, "objects": 1}
    src = {d["sop_uid"]: d["source"] for d in r["instances_detail"]}
    assert src[victim] == "objects"
    assert tree(tmp_path / "out")[victim] == inst.acked[victim]


def test_restore_from_dr_volumes_reads_each_volume_once_in_order(inst, tmp_path):
    assert json.loads(run_cli(inst.config, "dr", "write", "--json").stdout)["complete"]
    assert len(volumes_of(inst)) >= 2
    lose_online(inst)
    study = inst.ct[0].study_uid
    r = restore(inst, "--study", study, "--to", str(tmp_path / "out"))
    assert r["_rc"] == 1 and "no --identity" in r["failures"][0]["reason"]
    r = restore(inst, "--study", study, "--to", str(tmp_path / "out"), "--identity", str(inst.key))
    assert r["_rc"] == 0 and r["by_source"] == {"dr": len(inst.ct) + 1}
    seqs = [v["sequence"] for v in r["volumes_needed"]]
    assert seqs == sorted(seqs) and all(v["read"] for v in r["volumes_needed"])
    got = tree(tmp_path / "out")
    assert got == {k: inst.acked[k] for k in got} and len(got) == len(inst.ct) + 1
    # --from objects only: nothing there.
    r = restore(inst, "--study", study, "--to", str(tmp_path / "o2"), "--from", "objects")
    assert r["_rc"] == 1 and len(r["failures"]) == len(inst.ct) + 1


def test_a_missing_volume_is_named_with_the_studies_it_holds(inst, tmp_path):
    assert json.loads(run_cli(inst.config, "dr", "write", "--json").stdout)["complete"]
    lose_online(inst)
    run_cli(inst.config, "dr", "custody", "PV000002", "--to", "in-transit", "--location",
            "courier van", "--by", "J. Smith")
    run_cli(inst.config, "dr", "custody", "PV000002", "--to", "offsite", "--location",
            "vault 7", "--by", "Vault clerk")
    moved = tmp_path / "vault" / "PV000002.tar"
    moved.parent.mkdir()
    shutil.move(str(volumes_of(inst)[1]), moved)                # it really is not here
    r = restore(inst, "--patient", "TEST-0001", "--to", str(tmp_path / "out"),
                "--identity", str(inst.key))
    assert r["_rc"] == 1
    need = {v["barcode"]: v for v in r["volumes_needed"]}
    assert need["PV000002"]["must_recall"] and not need["PV000002"]["read"]
    assert need["PV000002"]["location"] == "vault 7"
    lost = {f["sop_uid"] for f in r["failures"]}
    on_two = {sop for (sop,) in db(inst, """select i.sop_uid from dr_instances di
        join instances i on i.id = di.instance_fk join dr_segments s on s.id = di.segment_fk
        join dr_volumes v on v.id = s.volume_fk where v.barcode = 'PV000002'""")}
    assert lost == on_two and lost
    assert all("PV000002" in f["reason"] and "recall it" in f["reason"] for f in r["failures"])
    assert "VOLUME PV000002" in r["_stderr"] and "recall it first" in r["_stderr"]
    # Brought back and given with --volume: the restore completes, skipping what it has.
    r = restore(inst, "--patient", "TEST-0001", "--to", str(tmp_path / "out"),
                "--identity", str(inst.key), "--volume", str(moved))
    assert r["_rc"] == 0 and r["restored"] == len(lost)
    assert tree(tmp_path / "out") == inst.acked


def test_an_interrupted_restore_resumes(inst, tmp_path):
    out = tmp_path / "out"
    p = run_cli(inst.config, "restore", "--patient", "TEST-0001", "--to", str(out), "--json",
                check=False, env={"PACSVAULT_FAILPOINTS": "restore.after_deliver=kill@4"})
    assert p.returncode == -9 and len(tree(out)) == 4
    r = restore(inst, "--patient", "TEST-0001", "--to", str(out), "--resume")
    assert r["_rc"] == 0 and r["already_there"] == 4
    assert r["restored"] == len(inst.acked) - 4 and tree(out) == inst.acked


def test_restore_back_online_after_both_sites_lost(inst, tmp_path):
    assert json.loads(run_cli(inst.config, "dr", "write", "--json").stdout)["complete"]
    before = site_state(inst)
    lose_online(inst)
    r = restore(inst, "--patient", "TEST-0001", "--online", "--identity", str(inst.key))
    assert r["_rc"] == 0 and r["by_source"] == {"dr": len(inst.acked)}
    assert site_state(inst) == before
    assert json.loads(run_cli(inst.config, "scrub", "--all", "--json").stdout)["ok"]


@pytest.mark.needs_orthanc
def test_restore_to_a_pacs_by_c_store(inst, tmp_path):
    from tests.support.orthanc import Orthanc

    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        study = inst.varied[0].study_uid
        r = restore(inst, "--study", study, "--to-ae", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
        assert r["_rc"] == 0 and r["restored"] == len(inst.varied)
        ids = orthanc.get("/instances")
        sops = {orthanc.instance_tags(i)["SOPInstanceUID"] for i in ids}
        assert orthanc.count_instances() == len(inst.varied)
        assert sops == {m.sop_uid for m in inst.varied}
        # A later restore is a new run: the PACS may have lost what it had, so all is sent.
        again = restore(inst, "--study", study, "--to-ae", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
        assert again["already_there"] == 0 and again["restored"] == len(inst.varied)
        assert orthanc.count_instances() == len(inst.varied)
    finally:
        orthanc.stop()


def test_bad_restore_arguments(inst, tmp_path):
    out = str(tmp_path / "o")
    cases = [
        ([], 4, "say where to"),
        (["--to", out], 4, "say what to restore"),
        (["--study", "1.2.3", "--to", out, "--online"], 4, "one of --to"),
        (["--study", "not-a-uid", "--to", out], 4, ""),
        (["--study", "1.2.3.4", "--to", out], 4, "no study"),
        (["--patient", "nobody", "--to", out], 4, "no study matches"),
        (["--from-date", "2024-01-01", "--to", out], 4, "YYYYMMDD"),
        (["--patient", "TEST-0001", "--to-ae", "bad target"], 4, "AE_TITLE@HOST:PORT"),
        (["--patient", "TEST-0001", "--to-ae", "X@127.0.0.1:1"], 4, "refused"),
        (["--patient", "TEST-0001", "--to", out, "--from", "tape"], 2, ""),
        (["--patient", "TEST-0001", "--to", out, "--identity", str(inst.config)], 4, "identity"),
    ]
    for args, code, text in cases:
        p = run_cli(inst.config, "restore", *args, check=False)
        assert p.returncode == code, (args, p.stderr)
        assert text in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def test_every_version_of_a_conflict_is_restored_from_each_tier(inst, tmp_path):
    v1, v2 = make_conflict(tmp_path / "conflict")
    inst.ingest([v1, v2])
    sums = dict(((sop, v), h) for sop, v, h in db(inst, "select sop_uid, version, sha256 "
                                                        "from instances where sop_uid = ?",
                                                  v1.sop_uid))
    want = {v1.sop_uid: sums[v1.sop_uid, 1], f"{v1.sop_uid}.v2": sums[v1.sop_uid, 2]}
    r = restore(inst, "--study", v1.study_uid, "--to", str(tmp_path / "online"))
    assert r["_rc"] == 0 and tree(tmp_path / "online") == want, r
    run_cli(inst.config, "migrate", "--study", v1.study_uid)
    r = restore(inst, "--study", v1.study_uid, "--to", str(tmp_path / "objects"),
                "--from", "objects")
    assert r["_rc"] == 0 and tree(tmp_path / "objects") == want, r
    assert json.loads(run_cli(inst.config, "dr", "write", "--json").stdout)["complete"]
    r = restore(inst, "--study", v1.study_uid, "--to", str(tmp_path / "dr"), "--from", "dr",
                "--identity", str(inst.key))
    assert r["_rc"] == 0 and tree(tmp_path / "dr") == want, r
