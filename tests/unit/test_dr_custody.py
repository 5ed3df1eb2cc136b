"""Chain of custody of DR volumes, the courier manifest (no PHI) and rotation."""
import json
import re
import sqlite3
from contextlib import closing
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, text

from archive.catalog.models import DrCustody, DrSegment, DrVolume, Patient, Study
from archive.errors import InvalidInput
from dr import custody
from dr.manifest_html import CODE39, code39_modules, code39_svg, render
from dr.volumes import list_volumes, rotation
from tests.support.daemon import run_cli
from tests.support.dataset import make_ct_series
from tests.support.tiering import Install

UTC = timezone.utc
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def inst(tmp_path):
    return Install.create(tmp_path / "pv")


def add_volume(inst, barcode, state="sealed", sealed=T0 - timedelta(days=400),
               retain=T0 - timedelta(days=10), location="", studies=2, seq=1):
    catalog = inst.catalog()
    try:
        with catalog.unit(write=True) as uow:
            v = DrVolume(barcode=barcode, pool="offsite", volume_set="0123abcd-" + "e" * 27,
                         sequence=seq, capacity=10**9, block_size=262144, bytes=123456789,
                         segments=3, studies=studies, state=state, location=location,
                         device=f"dr/volumes/{barcode}.tar", kind="stream", recipients="[]",
                         continues=False, writer="", created_at=sealed,
                         sealed_at=sealed if state != "failed" else None,
                         retain_until=retain if state != "failed" else None,
                         stream_sha256=(barcode.encode().hex() * 8)[:64]
                         if state != "failed" else None)
            uow.session.add(v)
            uow.commit()
            return v.id
    finally:
        catalog.close()


def rows(inst, barcode):
    catalog = inst.catalog()
    try:
        with catalog.unit() as uow:
            v = uow.session.scalars(select(DrVolume).where(DrVolume.barcode == barcode)).one()
            moves = [(r.from_state, r.to_state, r.location, r.actor, r.courier_ref, r.note, r.at)
                     for r in uow.session.scalars(select(DrCustody).where(
                         DrCustody.volume_fk == v.id).order_by(DrCustody.id))]
            return v.state, v.location, moves
    finally:
        catalog.close()


def custody_count(inst):
    catalog = inst.catalog()
    try:
        with catalog.unit() as uow:
            return uow.session.scalar(select(func.count()).select_from(DrCustody))
    finally:
        catalog.close()


def naive(t):
    return t.replace(tzinfo=None)


# -- the transition table and move() ------------------------------------------------------------

def test_a_full_legal_journey_is_recorded_move_by_move(inst):
    add_volume(inst, "PV000001")
    journey = [
        ("in-library", "Library, rack 2", "A. Operator", ""),
        ("in-transit", "Van of SecureCourier", "B. Driver", "SC-0001"),
        ("offsite", "Vault, shelf 7", "C. Clerk", "SC-0001"),
        ("recalled", "Vault, shelf 7", "C. Clerk", "RECALL-9"),
        ("returned", "Hospital reception", "D. Porter", "SC-0002"),
        ("expired", "Library, scratch shelf", "A. Operator", ""),
        ("destroyed", "Shredder, vendor ShredCo", "E. Witness", "CERT-42"),
    ]
    catalog = inst.catalog()
    try:
        for i, (state, where, who, ref) in enumerate(journey):
            ev = custody.move(catalog, "PV000001", state, where, who, ref, note=f"step {i}",
                              clock=lambda i=i: T0 + timedelta(hours=i))
            assert (ev["to_state"], ev["location"], ev["actor"]) == (state, where, who)
        hist = custody.history(catalog, "PV000001")
        chain = custody.check_chain(catalog, "PV000001")
    finally:
        catalog.close()
    state, location, moves = rows(inst, "PV000001")
    assert (state, location) == ("destroyed", "Shredder, vendor ShredCo")
    froms = ["sealed"] + [j[0] for j in journey[:-1]]
    assert moves == [(f, s, w, who, ref, f"step {i}", naive(T0 + timedelta(hours=i)))
                     for i, (f, (s, w, who, ref)) in enumerate(zip(froms, journey))]
    # The writer's seal comes first (not a logged row), then every move.
    assert hist[0]["implicit"] and hist[0]["to_state"] == "sealed" and hist[0]["id"] is None
    assert [e["to_state"] for e in hist] == ["sealed"] + [j[0] for j in journey]
    assert chain == {"barcode": "PV000001", "ok": True, "moves": 7, "state": "destroyed",
                     "problems": []}


@pytest.mark.parametrize("path,refused", [
    ([], "offsite"),                       # sealed must enter custody first
    ([], "expired"),
    ([], "destroyed"),                     # only from expired (or failed)
    ([], "sealed"),
    (["in-library"], "offsite"),           # nobody carried it there
    (["in-library"], "destroyed"),
    (["in-library", "in-transit", "offsite"], "destroyed"),
    (["in-library", "expired", "destroyed"], "in-library"),   # destroyed is final
    (["in-library", "expired"], "sealed"),                    # re-use is a new volume
])
def test_illegal_moves_are_refused_and_nothing_is_recorded(inst, path, refused):
    add_volume(inst, "PV000002")
    catalog = inst.catalog()
    try:
        for s in path:
            custody.move(catalog, "PV000002", s, "Library", "A. Operator", clock=lambda: T0)
        before = rows(inst, "PV000002")
        with pytest.raises(InvalidInput, match="cannot move to"):
            custody.move(catalog, "PV000002", refused, "Somewhere", "A. Operator",
                         clock=lambda: T0)
    finally:
        catalog.close()
    assert rows(inst, "PV000002") == before


def test_writer_states_cannot_move_except_failed_to_destroyed(inst):
    add_volume(inst, "PV000003", state="writing")
    add_volume(inst, "PV000004", state="failed")
    catalog = inst.catalog()
    try:
        for code, to in (("PV000003", "in-library"), ("PV000003", "destroyed"),
                         ("PV000004", "in-library"), ("PV000004", "expired")):
            with pytest.raises(InvalidInput, match="cannot move to"):
                custody.move(catalog, code, to, "Library", "A. Operator", clock=lambda: T0)
        assert custody_count(inst) == 0
        custody.move(catalog, "PV000004", "destroyed", "Degausser", "A. Operator",
                     clock=lambda: T0)
        assert custody.check_chain(catalog, "PV000004")["ok"]
        assert custody.history(catalog, "PV000004")[0]["to_state"] == "failed"
    finally:
        catalog.close()
    assert rows(inst, "PV000004")[0] == "destroyed"


def test_expiry_before_retention_is_refused_with_the_date(inst):
    add_volume(inst, "PV000005", retain=T0 + timedelta(days=3))
    catalog = inst.catalog()
    try:
        custody.move(catalog, "PV000005", "in-library", "Library", "A. Operator",
                     clock=lambda: T0)
        with pytest.raises(InvalidInput, match="retained until 2030-01-04"):
            custody.move(catalog, "PV000005", "expired", "Library", "A. Operator",
                         clock=lambda: T0)
        assert rows(inst, "PV000005")[0] == "in-library"
        custody.move(catalog, "PV000005", "expired", "Library", "A. Operator",
                     clock=lambda: T0 + timedelta(days=3))
    finally:
        catalog.close()
    assert rows(inst, "PV000005")[0] == "expired"


def test_bad_text_and_unknown_barcodes_are_refused(inst):
    add_volume(inst, "PV000006")
    catalog = inst.catalog()
    try:
        for kwargs, msg in (
                ({"location": "x" * 129}, "at most 128"),
                ({"actor": ""}, "--by must not be empty"),
                ({"actor": "   "}, "--by must not be empty"),
                ({"location": ""}, "--location must not be empty"),
                ({"actor": "A\nForged line"}, "control characters"),
                ({"actor": "A\x1b[2J"}, "control characters"),
                ({"note": "right-to-left \u202e override"}, "control characters"),
                ({"courier_ref": "r" * 129}, "at most 128"),
                ({"note": "n" * 513}, "at most 512"),
                ({"to_state": "nonsense"}, "unknown state"),
                ({"barcode": "NOPE"}, "no volume with barcode NOPE"),
                ({"barcode": "PV\n1"}, "printable")):
            args = {"barcode": "PV000006", "to_state": "in-library", "location": "Library",
                    "actor": "A. Operator"} | kwargs
            with pytest.raises(InvalidInput, match=msg):
                custody.move(catalog, clock=lambda: T0, **args)
    finally:
        catalog.close()
    assert custody_count(inst) == 0


# -- the chain check ----------------------------------------------------------------------------

def test_the_chain_check_finds_a_hand_edited_row(inst):
    add_volume(inst, "PV000007")
    catalog = inst.catalog()
    try:
        for i, s in enumerate(("in-library", "in-transit", "offsite", "recalled")):
            custody.move(catalog, "PV000007", s, "Somewhere", "A. Operator",
                         clock=lambda i=i: T0 + timedelta(hours=i))
        assert custody.check_chain(catalog, "PV000007")["ok"]
        ids = [r[0] for r in catalog.engine.connect().execute(
            text("SELECT id FROM dr_custody ORDER BY id"))]
        # Someone rewrites history: the volume "never went offsite".
        with catalog.engine.begin() as conn:
            conn.execute(text("UPDATE dr_custody SET to_state = 'in-library' WHERE id = :i"),
                         {"i": ids[2]})
        chain = custody.check_chain(catalog, "PV000007")
        assert not chain["ok"]
        assert chain["problems"] == [f"move {ids[3]}: from offsite, but the previous move "
                                     "ended in in-library"]
        # A row rewritten to a move the table does not allow.
        with catalog.engine.begin() as conn:
            conn.execute(text("UPDATE dr_custody SET to_state = 'destroyed' WHERE id = :i"),
                         {"i": ids[2]})
        chain = custody.check_chain(catalog, "PV000007")
        assert any(f"move {ids[2]}: in-transit -> destroyed is not a legal move" == p
                   for p in chain["problems"])
        # The last row edited: it no longer agrees with the volume.
        with catalog.engine.begin() as conn:
            conn.execute(text("UPDATE dr_custody SET to_state = 'offsite' WHERE id = :i"),
                         {"i": ids[2]})
            conn.execute(text("UPDATE dr_custody SET to_state = 'in-transit' WHERE id = :i"),
                         {"i": ids[3]})
        chain = custody.check_chain(catalog, "PV000007")
        assert chain["problems"] == ["the volume is recalled, but its chain ends in in-transit"]
        # A volume whose state changed with no logged move.
        with catalog.engine.begin() as conn:
            conn.execute(text("UPDATE dr_custody SET to_state = 'recalled' WHERE id = :i"),
                         {"i": ids[3]})
            conn.execute(text("UPDATE dr_volumes SET state = 'offsite' "
                              "WHERE barcode = 'PV000007'"))
        assert not custody.check_chain(catalog, "PV000007")["ok"]
    finally:
        catalog.close()


JOURNEY = [("in-library", "Library, rack 1", "A. Operator", ""),
           ("in-transit", "Courier van", "B. Driver", "SC-1"),
           ("offsite", "Vault, shelf 7", "C. Clerk", "SC-1"),
           ("recalled", "Vault, shelf 7", "C. Clerk", "RECALL-2")]


def custody_rows(inst) -> list[tuple]:
    with closing(sqlite3.connect(inst.config.parent / "catalog" / "catalog.db")) as c:
        return c.execute("SELECT * FROM dr_custody ORDER BY id").fetchall()


def cli_move(inst, barcode, to, where, who, courier="", check=True):
    args = ["dr", "custody", barcode, "--to", to, "--location", where, "--by", who]
    return run_cli(inst.config, *args, *(["--courier", courier] if courier else []),
                   check=check)


def test_every_verb_leaves_past_moves_as_they_were(inst, tmp_path):
    # Append-only by behaviour: each move through the CLI adds exactly one row and
    # leaves every earlier row byte for byte; refused moves, reads and the other DR
    # verbs change nothing; and the CLI has no option that names a past move.
    add_volume(inst, "PV000030", sealed=datetime.now(UTC) - timedelta(days=1))
    past: list[tuple] = []
    for to, where, who, ref in JOURNEY:
        cli_move(inst, "PV000030", to, where, who, ref)
        now = custody_rows(inst)
        assert now[:len(past)] == past and len(now) == len(past) + 1
        assert now[-1][0] > max((r[0] for r in past), default=0)
        past = now
    for args in (["dr", "custody", "PV000030", "--to", "destroyed", "--location", "X",
                  "--by", "Y"],                                          # illegal move
                 ["dr", "custody", "PV000030", "--to", "sealed", "--location", "X",
                  "--by", "Y"],
                 ["dr", "custody", "PV000030", "--history"],
                 ["dr", "volumes"], ["dr", "rotation"],
                 ["dr", "manifest", "PV000030", "--out", str(tmp_path / "m.html")],
                 ["dr", "custody", "PV000030", "--delete"],
                 ["dr", "custody", "PV000030", "--id", "1", "--to", "offsite"],
                 ["dr", "custody", "PV000030", "--edit", "1"]):
        run_cli(inst.config, *args, check=False)
        assert custody_rows(inst) == past, args
    for unknown in ("--delete", "--id", "--edit"):
        p = run_cli(inst.config, "dr", "custody", "PV000030", unknown, "1", check=False)
        assert p.returncode == 2 and "No such option" in p.stderr, p.stderr
    help_text = run_cli(inst.config, "dr", "custody", "--help").stdout
    options = set(re.findall(r"^  (--[a-z-]+)", help_text, flags=re.M))
    assert options == {"--to", "--location", "--by", "--courier", "--note", "--history",
                       "--json", "--config"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """An install with four moves of PV000031 recorded through the CLI, and the bytes
    of its catalog afterwards (each tampering test starts again from them)."""
    inst = Install.create(tmp_path_factory.mktemp("custody") / "pv")
    add_volume(inst, "PV000031", sealed=datetime.now(UTC) - timedelta(days=1))
    for to, where, who, ref in JOURNEY:
        cli_move(inst, "PV000031", to, where, who, ref)
    assert run_cli(inst.config, "dr", "custody", "PV000031", "--history").returncode == 0
    db = inst.config.parent / "catalog" / "catalog.db"
    return inst, db, db.read_bytes()


def tamper(recorded, sql: str) -> dict:
    """Restore the recorded catalog, run ``sql`` on it directly (someone with write
    access to the file), and return what `dr custody --history --json` says."""
    inst, db, pristine = recorded
    for extra in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        extra.unlink(missing_ok=True)
    db.write_bytes(pristine)
    with closing(sqlite3.connect(db)) as c:
        ids = [r[0] for r in c.execute("SELECT id FROM dr_custody ORDER BY id")]
        c.executescript(sql.format(*ids))
        c.commit()
    p = run_cli(inst.config, "dr", "custody", "PV000031", "--history", "--json", check=False)
    out = json.loads(p.stdout)
    return {"rc": p.returncode, **out["chain"]}


SWAP = """CREATE TEMP TABLE t AS SELECT * FROM dr_custody WHERE id = {1};
          UPDATE dr_custody SET from_state = (SELECT from_state FROM dr_custody WHERE id = {2}),
            to_state = (SELECT to_state FROM dr_custody WHERE id = {2}),
            location = (SELECT location FROM dr_custody WHERE id = {2}),
            actor = (SELECT actor FROM dr_custody WHERE id = {2}) WHERE id = {1};
          UPDATE dr_custody SET from_state = (SELECT from_state FROM t),
            to_state = (SELECT to_state FROM t), location = (SELECT location FROM t),
            actor = (SELECT actor FROM t) WHERE id = {2};"""


@pytest.mark.parametrize("sql", [
    "DELETE FROM dr_custody WHERE id = {1}",                         # a move erased
    "DELETE FROM dr_custody WHERE id = {0}",                         # the first
    "DELETE FROM dr_custody WHERE id = {3}",                         # the last
    "DELETE FROM dr_custody",                                        # all of them
    "UPDATE dr_custody SET to_state = 'in-library' WHERE id = {1}",  # never left
    "UPDATE dr_custody SET at = (SELECT at FROM dr_custody WHERE id = {3}) WHERE id = {0}",
    "UPDATE dr_custody SET at = '2000-01-01 00:00:00' WHERE id = {0}",   # before its seal
    SWAP,                                                            # two moves reordered
    "UPDATE dr_custody SET id = id + 100 WHERE id = {0}",            # the first made last
], ids=["delete-middle", "delete-first", "delete-last", "delete-all", "state-rewritten",
        "time-reordered", "before-seal", "rows-swapped", "id-reordered"])
def test_the_chain_check_finds_rows_deleted_rewritten_or_reordered(recorded, sql):
    chain = tamper(recorded, sql)
    assert chain["rc"] == 1 and not chain["ok"] and chain["problems"], chain


@pytest.mark.parametrize("sql", [
    "UPDATE dr_custody SET location = 'Somewhere else' WHERE id = {2}",
    "UPDATE dr_custody SET actor = 'Someone else' WHERE id = {1}",
    "UPDATE dr_custody SET courier_ref = 'SC-999' WHERE id = {1}",
    # every move erased and the volume put back as the writer left it
    "DELETE FROM dr_custody; UPDATE dr_volumes SET state = 'sealed', location = ''",
], ids=["location", "actor", "courier", "erased-and-reset"])
def test_the_chain_check_finds_a_past_move_rewritten_to_another_place_or_person(recorded, sql):
    chain = tamper(recorded, sql)
    assert chain["rc"] == 1 and not chain["ok"], chain


# -- the CLI ------------------------------------------------------------------------------------

def test_cli_custody_records_moves_and_refuses_hostile_input(inst):
    add_volume(inst, "PV000008", sealed=datetime.now(UTC) - timedelta(days=1))
    p = run_cli(inst.config, "dr", "custody", "PV000008", "--to", "in-library", "--location",
                "Library, rack 1", "--by", "A. Operator", "--note", "checked in", "--json")
    ev = json.loads(p.stdout)
    assert (ev["from_state"], ev["to_state"], ev["location"], ev["actor"], ev["note"]) == (
        "sealed", "in-library", "Library, rack 1", "A. Operator", "checked in")
    p = run_cli(inst.config, "dr", "custody", "PV000008", "--to", "in-transit", "--location",
                "Courier van", "--by", "B. Driver", "--courier", "SC-77")
    assert "in-library -> in-transit" in p.stdout
    hostile = [
        ("PV000008", "--to", "offsite", "--location", "L" * 10_000, "--by", "B. Driver"),
        ("PV000008", "--to", "offsite", "--location", "Vault", "--by", "B.\nDriver"),
        ("PV000008", "--to", "offsite", "--location", "Vault", "--by", "\x1b]0;pwned\x07"),
        ("PV000008", "--to", "offsite", "--location", "Vault", "--by", ""),
        ("PV999999", "--to", "offsite", "--location", "Vault", "--by", "B. Driver"),
        ("PV000008", "--to", "nonsense", "--location", "Vault", "--by", "B. Driver"),
        ("PV000008", "--to", "destroyed", "--location", "Vault", "--by", "B. Driver"),
        ("PV000008", "--to", "offsite", "--by", "B. Driver"),
        ("PV000008", "--location", "Vault"),
    ]
    for args in hostile:
        p = run_cli(inst.config, "dr", "custody", *args, check=False)
        assert p.returncode == 4, (args, p.stderr)
        err = p.stderr.strip()
        assert err.startswith("pacsvault: invalid input:") and "\n" not in err, err
        assert "Traceback" not in p.stderr and "\x1b" not in p.stderr and len(err) < 300
    assert len(rows(inst, "PV000008")[2]) == 2          # nothing recorded by the refused ones
    p = run_cli(inst.config, "dr", "custody", "PV000008", "--history", "--json")
    h = json.loads(p.stdout)
    assert [e["to_state"] for e in h["events"]] == ["sealed", "in-library", "in-transit"]
    assert h["events"][2]["courier_ref"] == "SC-77" and h["chain"]["ok"]
    p = run_cli(inst.config, "dr", "custody", "PV000008", "--history")
    assert "chain: ok, 2 moves" in p.stdout and "courier SC-77" in p.stdout


# -- the manifest -------------------------------------------------------------------------------

def test_code39_encodes_the_standard_patterns():
    assert len(CODE39) == 44
    for c, bits in CODE39.items():
        # 9 elements, 3 wide: two wide bars and one wide space, or 3 wide spaces ($/+%).
        assert len(bits) == 9 and bits.count("1") == 3, c
        assert bits[1::2].count("1") == (3 if c in "$/+%" else 1), c
    assert CODE39["*"] == "010010100" and CODE39["P"] == "001010010"
    mods = code39_modules("PV000001")
    # 10 characters (start and stop '*' included) of 15 modules, 9 one-module gaps.
    assert len(mods) == 10 * 15 + 9 and set(mods) == {"0", "1"}
    assert mods.startswith("1000101110111010")                       # '*' and its gap
    assert mods[16:31] == "101110111010001"                          # 'P': n n w n w n n w n
    assert mods.endswith("100010111011101")                          # the stop '*'
    svg = code39_svg("PV000001")
    assert svg.count('<rect x=') == 10 * 5                           # 5 bars per character
    for bad in ("pv000001", "PV*1", "", "PV_1"):
        with pytest.raises(ValueError):
            code39_modules(bad)


def test_the_manifest_shows_the_volumes_and_no_phi(inst, tmp_path):
    made = make_ct_series(tmp_path / "ct", 2, size=4000)
    inst.ingest(made)
    vol = add_volume(inst, "PV000010", studies=1)
    add_volume(inst, "PV000011", location='<script>alert("x")</script> & Co', seq=2)
    catalog = inst.catalog()
    try:
        with catalog.unit(write=True) as uow:
            study = uow.session.scalars(select(Study)).one()
            patient = uow.session.get(Patient, study.patient_fk)
            name = patient.name
            phi = [study.study_uid, patient.name, patient.patient_id, study.accession,
                   made[0].series_uid, made[0].sop_uid, made[1].sop_uid]
            uow.session.add(DrSegment(volume_fk=vol, study_fk=study.id, member="seg-000001",
                                      study_segment=1, last_of_study=True, offset=512, size=999,
                                      sha256="f" * 64, instances=2, bytes=8000))
            uow.commit()
    finally:
        catalog.close()
    assert name == "Test^Synthetic" and all(phi)
    out = tmp_path / "manifest.html"
    p = run_cli(inst.config, "dr", "manifest", "PV000010", "PV000011", "--out", str(out),
                "--courier", "SC-123")
    assert "2 volumes" in p.stdout
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    for v in ("PV000010", "PV000011"):
        assert v in page and f'aria-label="Code 39 {v}"' in page
        assert (v.encode().hex() * 8)[:64] in page                 # the stream SHA-256
    assert page.count("<svg") == 2 and "SC-123" in page and "0123abcd" in page
    assert "Released by" in page and "Received by" in page
    for s in phi + ["Test", "Synthetic", "TEST-0001"]:
        assert s not in page, s
    # Catalog text is escaped; nothing runs or loads from elsewhere.
    assert "<script" not in page and "&lt;script&gt;" in page and "&amp; Co" in page
    for s in ("src=", "href=", "url(", "@import", "javascript:", "http://", "https://"):
        assert s not in page.replace('xmlns="http://www.w3.org/2000/svg"', ""), s


def test_the_manifest_refuses_unknown_and_unsealed_volumes(inst, tmp_path):
    add_volume(inst, "PV000012", state="failed")
    add_volume(inst, "PV000013")
    out = tmp_path / "m.html"
    for args in (("PV000013", "NOPE"), ("PV000012",), ("PV000013", "--courier", "a\nb")):
        p = run_cli(inst.config, "dr", "manifest", *args, "--out", str(out), check=False)
        assert p.returncode == 4 and p.stderr.startswith("pacsvault: invalid input:"), p.stderr
    assert not out.exists()


def test_render_escapes_every_catalog_value():
    v = {"barcode": "PV<1>", "pool": "p&q", "volume_set": '"><img src=x>', "sequence": 1,
         "continues": True, "bytes": 5, "studies": 0, "sealed_at": T0, "sha256": "<b>",
         "state": "offsite", "location": "<i>vault</i>"}
    page = render([v], T0, courier_ref="<u>")
    for raw in ("<1>", "p&q", "<img", "<b>", "<i>", "<u>"):
        assert raw not in page
    assert "Code 39 cannot print" in page            # '<' has no Code 39 pattern


# -- rotation -----------------------------------------------------------------------------------

def test_rotation_lists_recyclable_and_soon_recyclable_volumes(inst):
    now = datetime.now(UTC)
    add_volume(inst, "PV000020", retain=now - timedelta(days=1), location="Vault")
    add_volume(inst, "PV000021", retain=now + timedelta(days=10))
    add_volume(inst, "PV000022", retain=now + timedelta(days=60))
    add_volume(inst, "PV000023", retain=now - timedelta(days=5))     # past, but in transit
    add_volume(inst, "PV000024", state="failed")
    catalog = inst.catalog()
    try:
        for code, path in (("PV000020", ("in-library", "in-transit", "offsite")),
                           ("PV000021", ("in-library",)), ("PV000022", ("in-library",)),
                           ("PV000023", ("in-library", "in-transit"))):
            for s in path:
                custody.move(catalog, code, s, "Vault", "A. Operator")
        r = rotation(catalog, days=30)
        listed = {v["barcode"]: v["recyclable"] for v in list_volumes(catalog)}
    finally:
        catalog.close()
    assert [v["barcode"] for v in r["recyclable"]] == ["PV000020"]
    assert [v["barcode"] for v in r["upcoming"]] == ["PV000023", "PV000021"]
    assert r["recyclable"][0]["retain_until"][:10] == (now - timedelta(days=1)).date().isoformat()
    assert listed == {"PV000020": True, "PV000021": False, "PV000022": False,
                      "PV000023": False, "PV000024": False}
    p = run_cli(inst.config, "dr", "rotation", "--json")
    j = json.loads(p.stdout)
    assert [v["barcode"] for v in j["recyclable"]] == ["PV000020"] and j["days"] == 30
    p = run_cli(inst.config, "dr", "rotation")
    assert "recyclable now: 1" in p.stdout and "PV000020" in p.stdout
