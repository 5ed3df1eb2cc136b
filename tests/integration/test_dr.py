"""DR volumes end to end: written through a pipe, a FIFO and an LTFS directory across
several small volumes, read back by pacsvault and by Debian's tar, age, zstd and
sha256sum, the catalog rebuilt from volumes alone, and every kind of damage."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support.daemon import PACSVAULT, run_cli
from tests.support.dataset import make_conflict, make_ct_series, make_varied_study
from tests.support.tiering import Install

SEGMENT = 128 * 1024
CAPACITY = 700_000           # a few segments per volume: studies span volumes


def set_dr(inst: Install, **values: str) -> None:
    """Edit keys of the [dr] table that 'pacsvault init' wrote (the last table)."""
    head, _, table = inst.config.read_text().partition("\n[dr]\n")
    for key, value in values.items():
        table, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", table, count=1, flags=re.M)
        assert n == 1, key
    inst.config.write_text(f"{head}\n[dr]\n{table}")


def configure(inst: Install, recipient: str | None = None) -> None:
    set_dr(inst, segment_bytes=str(SEGMENT), block_size="65536", capacity=str(CAPACITY))
    if recipient:
        set_dr(inst, recipients=f'["{recipient}"]')


@pytest.fixture
def dr(tmp_path):
    """An install with two studies (one with a 300 kB instance, cut into parts),
    a DR key pair, and the recipient in the config."""
    inst = Install.create(tmp_path / "pv")
    inst.varied = make_varied_study(tmp_path / "v", per_kind=2, size=30_000)
    inst.ct = make_ct_series(tmp_path / "ct", 12, size=40_000)
    inst.big = make_ct_series(tmp_path / "big", 1, size=300_000, seed=9)
    inst.ingest(inst.varied + inst.ct + inst.big)
    inst.key = tmp_path / "dr-key.txt"
    inst.recipient = run_cli(inst.config, "dr", "keygen", "--out", str(inst.key)).stdout.strip()
    configure(inst, inst.recipient)
    return inst


def online_sums(inst: Install) -> dict[str, str]:
    """SOP Instance UID (file name) -> SHA-256 of the acknowledged bytes on site-a."""
    return {p.name[:-4]: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (inst.settings.sites[0].path / "objects").rglob("*.dcm")}


def cli_json(inst: Install, *args: str, env: dict | None = None) -> dict:
    p = run_cli(inst.config, *args, "--json", check=False, env=env)
    out = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    return {**out, "_rc": p.returncode, "_stderr": p.stderr}


def db(inst: Install, sql: str, *args) -> list[tuple]:  # noqa: ANN002
    with sqlite3.connect(inst.settings.catalog.url.split("///", 1)[1]) as c:
        return c.execute(sql, args).fetchall()


def demographics(inst: Install) -> list[tuple]:
    """Per study: its facts and its patient's (PHI stays in this test's memory)."""
    return sorted(db(inst, """select s.study_uid, s.study_date, s.study_time, s.accession,
                              p.patient_id, p.name, p.birth_date, p.sex, p.issuer,
                              s.description from studies s join patients p on p.id = s.patient_fk"""))


def series_facts(inst: Install) -> list[tuple]:
    return sorted(db(inst, """select st.study_uid, se.series_uid, se.modality, se.series_number,
                              count(i.id) from series se join studies st on st.id = se.study_fk
                              left join instances i on i.series_fk = se.id
                              group by st.study_uid, se.series_uid, se.modality,
                              se.series_number"""))


def volumes_of(inst: Install) -> list[Path]:
    return sorted((inst.config.parent / "dr" / "volumes").glob("*.tar"))


# -- keys ------------------------------------------------------------------------------
def test_keygen_writes_the_identity_only_to_its_file(tmp_path):
    inst = Install.create(tmp_path / "pv")
    key = tmp_path / "k.txt"
    p = run_cli(inst.config, "dr", "keygen", "--out", str(key))
    recipient = p.stdout.strip()
    assert recipient.startswith("age1") and len(recipient) == 62
    secret = [ln for ln in key.read_text().splitlines() if ln.startswith("AGE-SECRET-KEY-")]
    assert len(secret) == 1 and secret[0] not in p.stdout + p.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "offline" in p.stderr
    again = run_cli(inst.config, "dr", "keygen", "--out", str(key), check=False)
    assert again.returncode == 4 and "never overwritten" in again.stderr
    # Debian's age reads our identity file.
    enc = subprocess.run(["age", "-r", recipient], input=b"x", capture_output=True, check=True)
    dec = subprocess.run(["age", "-d", "-i", str(key)], input=enc.stdout, capture_output=True)
    assert dec.stdout == b"x"


# -- round trips -------------------------------------------------------------------------
def test_volumes_through_a_pipe_span_sets_and_restore_with_standard_tools(dr, tmp_path):
    """`--device -`: each run streams one volume to stdout (a pipe: a seek would fail);
    the set continues on the next run until everything is written."""
    before = online_sums(dr)
    vols = []
    for n in range(1, 10):
        p = subprocess.Popen([PACSVAULT, "--config", str(dr.config), "dr", "write", "--device",
                              "-", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        data, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        report = json.loads(err.decode()[err.decode().index("{"):err.decode().rindex("}") + 1])
        vol = tmp_path / f"pipe-{n}.tar"
        vol.write_bytes(data)
        vols.append(vol)
        assert report["volumes"][0]["sha256"] == hashlib.sha256(data).hexdigest()
        assert len(data) % 65536 == 0 and len(data) <= CAPACITY
        if report["complete"]:
            break
        assert report["next_barcode"] and "load the next volume" in err.decode()
    assert len(vols) >= 3
    rows = db(dr, "select barcode, sequence, state, continues from dr_volumes order by id")
    assert [r[1] for r in rows] == list(range(1, len(vols) + 1))
    assert all(r[2] == "sealed" for r in rows) and rows[-1][3] == 0 and rows[0][3] == 1
    assert len({r[0] for r in db(dr, "select volume_set from dr_volumes")}) == 1

    # The recipe of docs/formats/dr-volume.md, with Debian's tools only.
    out = tmp_path / "restored"
    out.mkdir()
    for i, vol in enumerate(vols):
        x = tmp_path / f"x{i}"
        x.mkdir()
        subprocess.run(["tar", "-xf", str(vol), "-C", str(x)], check=True)
        label = json.loads((x / "PACSVAULT-LABEL.json").read_text())
        assert label["sequence"] == i + 1 and "study" not in json.dumps(label).lower()
        for seg in sorted((x / "seg").glob("*.age")):
            subprocess.run(f"age -d -i {dr.key} {seg} | zstd -d | tar -x -C {out}",
                           shell=True, check=True)
        # The whole catalog as it was when the volume was opened: an SQLite file.
        [snap] = (x / "catalog-backup").glob("catalog-*.sqlite.zst.age")
        subprocess.run(f"age -d -i {dr.key} {snap} | zstd -d > {x / 'catalog.db'}",
                       shell=True, check=True)
        with sqlite3.connect(x / "catalog.db") as c:
            assert c.execute("select count(*) from instances").fetchone()[0] == len(before)
            assert c.execute("select count(*) from dr_volumes where barcode = ?",
                             (label["barcode"],)).fetchone()[0] == 0   # opened after it
        key = json.loads(subprocess.run(["age", "-d", "-i", str(dr.key),
                                         str(x / "catalog-backup" / "audit-key.json.age")],
                                        check=True, capture_output=True).stdout)
        assert key["format"] == "pacsvault-audit-key" and len(key["key_file"].strip()) == 64
    sums = subprocess.run("sha256sum -c pacsvault/*.sha256 | grep -vc ': OK$'", shell=True,
                          cwd=out, capture_output=True, text=True)
    assert sums.stdout.strip() == "0", sums.stdout
    big = dr.big[0].sop_uid
    parts = sorted(out.rglob(f"{big}.dcm.part*"))
    assert len(parts) == 3                                       # 300 kB in 128 KiB parts
    subprocess.run(f"cat {' '.join(map(str, parts))} > {parts[0].parent / (big + '.dcm')}",
                   shell=True, check=True)
    joined = subprocess.run("sha256sum -c pacsvault/*.joined-sha256", shell=True, cwd=out,
                            capture_output=True, text=True)
    assert joined.returncode == 0 and ": OK" in joined.stdout
    restored = {p.name[:-4]: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in out.rglob("*.dcm")}
    assert restored == before                                   # every instance, bit-identical


def test_fifo_device_and_pacsvault_verify(dr, tmp_path):
    fifo = tmp_path / "tape.fifo"
    os.mkfifo(fifo)
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(fifo.read_bytes()))
    reader.start()
    r = cli_json(dr, "dr", "write", "--device", str(fifo), "--barcode", "TAPE01")
    reader.join(60)
    assert r["_rc"] == 0 and r["volumes"][0]["barcode"] == "TAPE01" and not r["complete"]
    vol = tmp_path / "TAPE01.tar"
    vol.write_bytes(bytes(got))
    v = cli_json(dr, "dr", "verify", str(vol), "--identity", str(dr.key))
    assert v["_rc"] == 0 and v["ok"] and v["stream_sha256"] == v["recorded_sha256"]
    assert v["segments"] == v["segments_ok"] > 0


def test_ltfs_directory_spans_volumes_in_one_run_and_verifies_by_barcode(dr, tmp_path):
    mount = tmp_path / "ltfs"
    mount.mkdir()
    r = cli_json(dr, "dr", "write", "--ltfs", str(mount))
    assert r["_rc"] == 0 and r["complete"] and len(r["volumes"]) >= 3
    for v in r["volumes"]:
        root = mount / v["barcode"]
        assert (root / "PACSVAULT-LABEL.json").is_file() and (root / "INDEX.json.zst.age").is_file()
        assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) <= CAPACITY
    codes = [v["barcode"] for v in r["volumes"]]
    check = cli_json(dr, "dr", "verify", *codes, "--identity", str(dr.key))
    assert check["_rc"] == 0 and all(v["ok"] for v in check["volumes"])
    listed = cli_json(dr, "dr", "volumes")
    assert [v["barcode"] for v in listed["volumes"]] == codes
    again = cli_json(dr, "dr", "write", "--ltfs", str(mount))     # nothing left to write
    assert again["_rc"] == 0 and again["volumes"] == [] and again["complete"]


def test_catalog_rebuilt_from_volumes_alone_in_any_order(dr, tmp_path):
    assert cli_json(dr, "dr", "write")["complete"]
    vols = volumes_of(dr)
    assert len(vols) >= 3
    want = sorted(db(dr, "select sop_uid, version, size, sha256, received_at from instances"))
    studies = sorted(db(dr, "select study_uid, study_date, accession from studies"))
    fresh = Install.create(tmp_path / "fresh")                   # everything else lost
    r = cli_json(fresh, "dr", "rebuild-catalog", "--identity", str(dr.key),
                 *map(str, reversed(vols)))
    assert r["_rc"] == 0 and r["ok"] and r["studies_complete"] == 3
    [s] = r["sets"].values()
    assert s["missing"] == [] and s["complete"]
    got = sorted(db(fresh, "select sop_uid, version, size, sha256, received_at from instances"))
    assert [g[:4] for g in got] == [w[:4] for w in want]
    assert sorted(db(fresh, "select study_uid, study_date, accession from studies")) == studies
    # Who each study belongs to, and what its series are, exactly as in the original.
    facts = demographics(dr)
    assert len(facts) == 3 and all(f[4] and f[5] and f[6] for f in facts)  # not vacuous
    assert demographics(fresh) == facts
    assert series_facts(fresh) == series_facts(dr)
    assert sorted(db(fresh, "select barcode from dr_volumes")) == \
        sorted(db(dr, "select barcode from dr_volumes"))
    # Idempotent; and a subset reports what is missing.
    again = Install.create(tmp_path / "subset")
    r2 = cli_json(again, "dr", "rebuild-catalog", "--identity", str(dr.key), str(vols[0]),
                  str(vols[2]))
    assert r2["_rc"] == 1 and list(r2["sets"].values())[0]["missing"] == [2]
    assert r2["incomplete_studies"] and "MISSING from set" in r2["_stderr"]


# -- damage -------------------------------------------------------------------------------
def test_a_truncated_volume_keeps_what_is_before_the_damage_and_names_the_study(dr, tmp_path):
    assert cli_json(dr, "dr", "write")["complete"]
    rows = db(dr, """select v.barcode, s.member, s.offset, s.size, st.study_uid from dr_segments s
                  join dr_volumes v on v.id = s.volume_fk join studies st on st.id = s.study_fk
                  where v.sequence = 1 order by s.offset""")
    assert len(rows) >= 2
    barcode, member, offset, size, study = rows[1]
    vol = volumes_of(dr)[0]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(vol.read_bytes()[:offset + 512 + size // 2])  # mid-way through member 2
    v = cli_json(dr, "dr", "verify", str(cut), "--identity", str(dr.key))
    assert v["_rc"] == 1 and not v["complete"]
    assert v["segments_ok"] == 1
    assert [d["member"] for d in v["damaged"]] == [member]
    assert v["affected_studies"] == [study]                    # named, though the index is lost
    assert f"DAMAGED {barcode}: {member} (study {study})" in v["_stderr"]
    fresh = Install.create(tmp_path / "fresh")
    # Its signature went with its end: refused, unless the operator trusts it.
    r = cli_json(fresh, "dr", "rebuild-catalog", "--identity", str(dr.key), str(cut))
    assert r["_rc"] == 1 and "not signed" in r["volumes"][0]["imported"]["refused"]
    r = cli_json(fresh, "dr", "rebuild-catalog", "--identity", str(dr.key), str(cut),
                 "--trust-unsigned")
    assert r["_rc"] == 1 and r["volumes"][0]["imported"]["segments"] == 1
    assert db(fresh, "select count(*) from dr_segments") == [(1,)]


def test_a_flipped_byte_fails_that_member_only(dr, tmp_path):
    assert cli_json(dr, "dr", "write")["complete"]
    rows = db(dr, """select s.member, s.offset, s.size, st.study_uid from dr_segments s
                  join dr_volumes v on v.id = s.volume_fk join studies st on st.id = s.study_fk
                  where v.sequence = 2 order by s.offset""")
    member, offset, size, study = rows[-1]
    vol = volumes_of(dr)[1]
    raw = bytearray(vol.read_bytes())
    raw[offset + 512 + size - 100] ^= 0x01
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    v = cli_json(dr, "dr", "verify", str(bad), "--identity", str(dr.key))
    assert v["_rc"] == 1 and v["segments_ok"] == v["segments"] - 1
    assert [(d["member"], d["study_uid"]) for d in v["damaged"]] == [(member, study)]
    assert "decrypt" in v["damaged"][0]["error"]
    assert any("SHA-256 differs" in p for p in v["problems"])   # the stream hash, too


def test_wrong_or_missing_key_and_a_volume_from_another_set(dr, tmp_path):
    assert cli_json(dr, "dr", "write")["complete"]
    vol = str(volumes_of(dr)[0])
    other = tmp_path / "other.txt"
    run_cli(dr.config, "dr", "keygen", "--out", str(other))
    p = run_cli(dr.config, "dr", "verify", vol, "--identity", str(other), check=False)
    assert p.returncode == 4 and "matches none of its recipients" in p.stderr
    secret = [ln for ln in other.read_text().splitlines() if ln.startswith("AGE-SECRET")][0]
    assert secret not in p.stderr + p.stdout
    for bad in (tmp_path / "nope.txt", dr.config):              # missing; not a key file
        p = run_cli(dr.config, "dr", "verify", vol, "--identity", str(bad), check=False)
        assert p.returncode == 4 and "Traceback" not in p.stderr
    # Another install's PV000001: same barcode, another set.
    inst2 = Install.create(tmp_path / "pv2")
    inst2.ingest(make_ct_series(tmp_path / "ct2", 2, size=4000, seed=5))
    configure(inst2, dr.recipient)
    assert cli_json(inst2, "dr", "write")["_rc"] == 0
    foreign = str(volumes_of(inst2)[0])
    v = cli_json(dr, "dr", "verify", foreign, "--identity", str(dr.key))
    assert v["_rc"] == 1 and any("from another set" in p for p in v["problems"])
    r = cli_json(dr, "dr", "rebuild-catalog", "--identity", str(dr.key), foreign)
    assert r["_rc"] == 1 and "another set" in r["volumes"][0]["imported"]["refused"]


def test_writer_killed_mid_volume_is_marked_failed_and_rewritten(dr):
    p = run_cli(dr.config, "dr", "write", "--json", check=False,
                env={"PACSVAULT_FAILPOINTS": "dr.after_member=kill@2"})
    assert p.returncode == -9
    assert db(dr, "select state from dr_volumes") == [("writing",)]
    r = cli_json(dr, "dr", "write")
    assert r["_rc"] == 0 and r["complete"] and r["failed_volumes"] == ["PV000001"]
    assert db(dr, "select state from dr_volumes where barcode = 'PV000001'") == [("failed",)]
    assert r["volumes"][0]["barcode"] == "PV000002"
    # Every instance is on a sealed volume.
    assert db(dr, """select count(distinct i.instance_fk) from dr_instances i
                  join dr_segments s on s.id = i.segment_fk join dr_volumes v on v.id = s.volume_fk
                  where v.state = 'sealed'""") == db(dr, "select count(*) from instances")


def test_only_new_studies_are_written_next_time(dr, tmp_path):
    assert cli_json(dr, "dr", "write")["complete"]
    n = db(dr, "select count(*) from dr_volumes")[0][0]
    assert cli_json(dr, "dr", "write")["volumes"] == []
    dr.ingest(make_ct_series(tmp_path / "new", 3, size=5000, seed=11))
    r = cli_json(dr, "dr", "write")
    assert r["studies"] == 1 and r["instances"] == 3 and len(r["volumes"]) == 1
    assert db(dr, "select count(*) from dr_volumes")[0][0] == n + 1


def test_bad_input_to_dr_write(dr, tmp_path):
    cases = [
        (["--recipient", "age1notakey"], 4, "not an age"),
        (["--recipient", "AGE-SECRET-KEY-1" + "Q" * 58], 4, "does not belong"),
        (["--capacity", "100"], 2, ""),
        (["--capacity", "300000"], 4, "segment_bytes"),
        (["--device", "-", "--ltfs", str(tmp_path)], 4, "not both"),
        (["--ltfs", str(tmp_path / "not-mounted")], 4, "not a directory"),
        (["--barcode", "../../x"], 4, "letters, digits"),
        (["--study", "1.2.3.4.5.6"], 4, "no study"),
    ]
    for args, code, text in cases:
        p = run_cli(dr.config, "dr", "write", *args, check=False)
        assert p.returncode == code, (args, p.stderr)
        assert text in p.stderr and "Traceback" not in p.stderr
    bare = Install.create(tmp_path / "bare")
    p = run_cli(bare.config, "dr", "write", check=False)
    assert p.returncode == 4 and "no DR recipients" in p.stderr
    set_dr(bare, recipients='["AGE-SECRET-KEY-1XYZ"]')
    p = run_cli(bare.config, "status", check=False)
    assert p.returncode == 3 and "does not belong in the config" in p.stderr
    assert "AGE-SECRET-KEY-1XYZ" not in p.stderr


def test_hostile_volumes_are_refused_cleanly(dr, tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(100_000))
    v = cli_json(dr, "dr", "verify", str(junk), "--identity", str(dr.key))
    assert v["_rc"] == 1 and v["problems"] and "Traceback" not in v["_stderr"]
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    v = cli_json(dr, "dr", "verify", str(empty), "--identity", str(dr.key))
    assert v["_rc"] == 1 and "not a pacsvault DR volume" in v["problems"][0]
    # A real tar that is not ours, with a member claiming to be huge.
    other = tmp_path / "other.tar"
    subprocess.run(["tar", "-cf", str(other), "-C", str(dr.config.parent), "pacsvault.toml"],
                   check=True)
    v = cli_json(dr, "dr", "verify", str(other), "--identity", str(dr.key))
    assert v["_rc"] == 1 and "Traceback" not in v["_stderr"]
    p = run_cli(dr.config, "dr", "verify", "NOSUCH", "--identity", str(dr.key), check=False)
    assert p.returncode == 4 and "no volume with that barcode" in p.stderr
    shutil.rmtree(tmp_path / "pv" / "dr", ignore_errors=True)


def test_the_scheduled_dr_job_writes_and_records_its_run(dr, tmp_path):
    from archive.app.scheduled import configured_jobs, run_dr_write_job

    assert "dr-write" in [name for name, _, _ in configured_jobs(dr.settings)]
    j = run_dr_write_job(dr.settings, threading.Event())
    assert j["complete"] and len(j["volumes"]) >= 3 and j["studies"] == 3
    runs = json.loads(run_cli(dr.config, "jobs", "--json", "--job", "dr-write").stdout)["runs"]
    assert runs[0]["outcome"] == "ok" and runs[0]["summary"]["instances"] == len(dr.stored)
    st = json.loads(run_cli(dr.config, "status", "--json").stdout)
    assert st["jobs"]["dr-write"]["last_run"]["trigger"] == "schedule"


def test_every_version_of_a_conflict_goes_onto_volumes_and_comes_back(tmp_path):
    inst = Install.create(tmp_path / "pv")
    v1, v2 = make_conflict(tmp_path / "in")
    inst.ingest([v1, v2])
    key = tmp_path / "k.txt"
    configure(inst, run_cli(inst.config, "dr", "keygen", "--out", str(key)).stdout.strip())
    w = cli_json(inst, "dr", "write")
    assert w["_rc"] == 0 and w["ok"] and w["complete"] and w["instances"] == 2, w
    sums = dict(((sop, v), h) for sop, v, h in db(inst, "select sop_uid, version, sha256 "
                                                        "from instances"))
    out = tmp_path / "out"
    r = cli_json(inst, "restore", "--study", v1.study_uid, "--to", str(out), "--from", "dr",
                 "--identity", str(key))
    assert r["_rc"] == 0 and r["restored"] == 2, r
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.dcm")}
    assert got == {f"{v1.sop_uid}.dcm": sums[v1.sop_uid, 1],
                   f"{v1.sop_uid}.v2.dcm": sums[v1.sop_uid, 2]}
