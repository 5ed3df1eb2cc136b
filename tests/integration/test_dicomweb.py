"""DICOMweb against `pacsvault serve`, with dicomweb-client (PyPI) and plain HTTP:
QIDO-RS matching at every level, WADO-RS instances byte for byte as received
(online, and from the object tier after migration), metadata without bulk data,
STOW-RS through the C-STORE path (two verified copies before "stored"), the
accounts and roles, and hostile requests that must be refused without storing
anything or echoing a value."""
from __future__ import annotations

import base64
import email.parser
import json
import sqlite3
import uuid
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from requests.auth import HTTPBasicAuth

from archive import auth
from archive.app.compose import open_catalog
from archive.dicom.part10 import dataset_offset
from tests.support.daemon import Daemon, free_port, run_cli
from tests.support.dataset import make_ct_series, make_varied_study
from tests.support.tiering import Install

PW = "Correct-Horse-7-Battery"


@pytest.fixture
def pv(tmp_path):
    inst = Install.create(tmp_path / "pv")
    inst.varied = make_varied_study(tmp_path / "v", per_kind=1, size=20_000)
    inst.ct = make_ct_series(tmp_path / "ct", 6, size=30_000, patient_id="PID-CT-7")
    inst.ingest(inst.varied + inst.ct)
    inst.by_sop = {m.sop_uid: m for m in inst.varied + inst.ct}
    return inst


@contextmanager
def serving(inst: Install, workers: int = 1):
    d = Daemon(inst.config, free_port(), free_port(), workers=workers).start()
    try:
        d.base = f"http://127.0.0.1:{d.http_port}/dicomweb"
        yield d
    finally:
        d.stop()


def dataset_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(dataset_offset(f))
        return f.read()


def parts(response: requests.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part, split by the standard library's MIME
    parser (independent of pacsvault's own multipart code)."""
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    msg = email.parser.BytesParser().parsebytes(head + response.content)
    assert msg.is_multipart(), response.headers
    return [(p.get("Content-Type"), p.get_payload(decode=True)) for p in msg.get_payload()]


def sop_of(part: bytes) -> str:
    import io
    return str(pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True).SOPInstanceUID)


def after_meta(part: bytes) -> bytes:
    import io
    return part[dataset_offset(io.BytesIO(part)):]


def db(inst: Install, sql: str, *args) -> list[tuple]:  # noqa: ANN002
    with sqlite3.connect(inst.settings.catalog.url.split("///", 1)[1]) as c:
        return c.execute(sql, args).fetchall()


def value(match: dict, tag: str):  # noqa: ANN201
    v = match.get(tag, {}).get("Value")
    return v[0] if v else None


# -- QIDO-RS ------------------------------------------------------------------------------
def test_qido_searches_studies_series_and_instances_with_the_matching_rules(pv):
    ct = pv.ct[0]
    with serving(pv) as d:
        c = DICOMwebClient(d.base)
        studies = c.search_for_studies()
        assert {value(s, "0020000D") for s in studies} == {pv.varied[0].study_uid, ct.study_uid}
        [mine] = c.search_for_studies(search_filters={"PatientID": "PID-CT-7"})
        assert value(mine, "0020000D") == ct.study_uid
        assert value(mine, "00201208") == len(pv.ct)             # NumberOfStudyRelatedInstances
        assert value(mine, "00081190").endswith(f"/dicomweb/studies/{ct.study_uid}")
        assert c.search_for_studies(search_filters={"PatientID": "PID-CT-*"}) != []
        assert c.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []
        assert c.search_for_studies(search_filters={"StudyDate": "19000101-19000102"}) == []
        # the study's UID list, by QIDO's comma form
        both = c.search_for_studies(search_filters={
            "StudyInstanceUID": f"{ct.study_uid},{pv.varied[0].study_uid}"})
        assert len(both) == 2

        [series] = c.search_for_series(ct.study_uid)
        assert value(series, "0020000E") == ct.series_uid and value(series, "00080060") == "CT"
        assert value(series, "00201209") == len(pv.ct)
        every_series = c.search_for_series()                      # relational: all studies
        assert ct.series_uid in {value(s, "0020000E") for s in every_series}
        assert all(value(s, "0020000D") for s in every_series)   # each names its study

        instances = c.search_for_instances(ct.study_uid, ct.series_uid)
        assert {value(i, "00080018") for i in instances} == {m.sop_uid for m in pv.ct}
        page = c.search_for_instances(ct.study_uid, ct.series_uid, limit=2, offset=1)
        assert [value(i, "00080018") for i in page] == \
            [value(i, "00080018") for i in instances][1:3]
        everywhere = c.search_for_instances(search_filters={"SOPInstanceUID": pv.ct[3].sop_uid})
        assert [value(i, "00080018") for i in everywhere] == [pv.ct[3].sop_uid]

    rows = db(pv, "select actor, detail from audit_log where action = 'query'")
    assert len(rows) >= 9 and all(json.loads(r[1]).get("service") == "QIDO-RS" for r in rows)


def test_bad_qido_parameters_are_refused_without_echoing_values(pv):
    secret = "Zebulon^Quixote"
    with serving(pv) as d:
        for query in (f"NoSuchAttribute={secret}", f"PatientName={secret}&PatientName=x",
                      "StudyDate=2024-01-01", "limit=-1", "offset=many",
                      "ReferencedStudySequence=x", f"PatientName={'A' * 5000}",
                      "SOPInstanceUID=1.2.3"):             # an IMAGE key at the study level
            r = requests.get(f"{d.base}/studies?{query}", timeout=30)
            assert r.status_code == 400, (query, r.status_code, r.text)
            assert secret not in r.text and "AAAA" not in r.text
        assert requests.get(f"{d.base}/studies/{'9' * 80}/series", timeout=30).status_code == 400
        assert requests.get(f"{d.base}/studies/1.2.x/series", timeout=30).status_code == 400
        assert requests.get(f"{d.base}/nothing", timeout=30).status_code == 404
        assert requests.delete(f"{d.base}/studies", timeout=30).status_code == 405


def test_a_search_over_the_cap_is_refused_with_a_clear_status(tmp_path):
    inst = Install.create(tmp_path / "pv")
    text = inst.config.read_text().replace("max_query_matches = 1000", "max_query_matches = 3")
    assert "max_query_matches = 3" in text
    inst.config.write_text(text)
    inst.ingest(make_ct_series(tmp_path / "ct", 5, size=4000))
    with serving(inst) as d:
        r = requests.get(f"{d.base}/instances", timeout=30)
        assert r.status_code == 413 and "max_query_matches" in r.text
        r = requests.get(f"{d.base}/studies", timeout=30)
        assert r.status_code == 200 and len(r.json()) == 1


# -- WADO-RS ------------------------------------------------------------------------------
def test_wado_sends_every_instance_byte_for_byte_and_metadata_without_bulk_data(pv):
    study = pv.varied[0].study_uid
    ct = pv.ct[0]
    with serving(pv) as d:
        r = requests.get(f"{d.base}/studies/{study}", timeout=120,
                         headers={"Accept": 'multipart/related; type="application/dicom"'})
        assert r.status_code == 200
        got = {sop_of(body): (ctype, body) for ctype, body in parts(r)}
        assert set(got) == {m.sop_uid for m in pv.varied}          # every kind and syntax
        for uid, (ctype, body) in got.items():
            assert after_meta(body) == dataset_bytes(pv.by_sop[uid].path)
            assert pv.by_sop[uid].transfer_syntax in ctype

        c = DICOMwebClient(d.base)
        series = c.retrieve_series(ct.study_uid, ct.series_uid)
        assert {str(ds.SOPInstanceUID) for ds in series} == {m.sop_uid for m in pv.ct}
        one = c.retrieve_instance(ct.study_uid, ct.series_uid, pv.ct[2].sop_uid)
        assert str(one.SOPInstanceUID) == pv.ct[2].sop_uid

        meta = c.retrieve_series_metadata(ct.study_uid, ct.series_uid)
        assert len(meta) == len(pv.ct)
        assert all(m["0020000D"]["Value"] == [ct.study_uid] for m in meta)
        assert all("7FE00010" not in m or "InlineBinary" not in m["7FE00010"] for m in meta)
        assert len(json.dumps(meta)) < 20_000 * len(pv.ct) / 4     # no pixel data in it

        missing = "1.2.826.0.1.3680043.999.1"
        assert requests.get(f"{d.base}/studies/{missing}", timeout=30).status_code == 404
        assert requests.get(f"{d.base}/studies/{study}", timeout=30,
                            headers={"Accept": "text/html"}).status_code == 406
        assert requests.get(f"{d.base}/studies/..%2F..%2Fetc", timeout=30).status_code in (400, 404)
    rows = db(pv, "select detail from audit_log where action = 'retrieve'")
    assert any(json.loads(r[0]).get("sop_class") == "WADO-RS" for r in rows)


def test_wado_of_a_migrated_study_reads_the_object_tier_and_a_rotten_copy_its_twin(pv):
    study = pv.varied[0].study_uid
    run_cli(pv.config, "migrate", "--study", study)
    assert not any(any((s.path / "objects").rglob(f"{pv.varied[0].sop_uid}.dcm"))
                   for s in pv.settings.sites)                      # purged online
    a, b = pv.settings.sites
    ct = pv.ct[0]
    for m in pv.ct:           # every copy on A rotten: the reads that go to A must fail over
        [rotten] = (a.path / "objects").rglob(f"{m.sop_uid}.dcm")
        raw = bytearray(rotten.read_bytes())
        raw[-30] ^= 0x55
        rotten.write_bytes(bytes(raw))
    with serving(pv) as d:
        [found] = requests.get(f"{d.base}/studies?StudyInstanceUID={study}", timeout=30).json()
        assert value(found, "00080056") == "NEARLINE"              # InstanceAvailability
        got = {sop_of(body): body for _, body in
               parts(requests.get(f"{d.base}/studies/{study}", timeout=120))}
        assert set(got) == {m.sop_uid for m in pv.varied}
        assert all(after_meta(v) == dataset_bytes(pv.by_sop[k].path) for k, v in got.items())
        r = requests.get(f"{d.base}/studies/{ct.study_uid}/series/{ct.series_uid}", timeout=60)
        got = {sop_of(body): body for _, body in parts(r)}
        assert set(got) == {m.sop_uid for m in pv.ct}
        assert all(after_meta(v) == dataset_bytes(pv.by_sop[k].path) for k, v in got.items())
    marks = ",".join("?" * len(pv.ct))
    states = db(pv, "select c.location, c.state from copies c join instances i on "
                f"i.id = c.instance_fk where i.sop_uid in ({marks})", *[m.sop_uid for m in pv.ct])
    assert ("site-a", "missing") in states and ("site-b", "missing") not in states  # repair queued


def test_wado_of_a_study_only_on_dr_volumes_is_refused_naming_the_volumes(pv, tmp_path):
    from tests.integration.test_dicom_move import only_on_dr_volumes
    _, alerts, barcodes = only_on_dr_volumes(pv, tmp_path)
    ct = pv.ct[0]
    with serving(pv) as d:
        r = requests.get(f"{d.base}/studies/{ct.study_uid}", timeout=60)
    assert r.status_code == 503 and "DR volumes" in r.text
    assert any(b in r.text for b in barcodes) and "PID-CT-7" not in r.text
    [alert] = [json.loads(x) for x in alerts.read_text().splitlines()]
    assert alert["source"] == "retrieve" and all(b in alert["summary"] for b in barcodes)
    assert ct.study_uid not in json.dumps(alert)
    queue = json.loads(run_cli(pv.config, "status", "--json").stdout)["restore_queue"]
    assert queue["studies"] == 1 and set(queue["volumes"]) <= barcodes


# -- STOW-RS ------------------------------------------------------------------------------
def related_body(files: list[bytes], boundary: str = "pv-test-boundary") -> tuple[bytes, str]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + f + b"\r\n" for f in files) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_stow_stores_through_the_ingest_path_on_both_sites(tmp_path):
    inst = Install.create(tmp_path / "pv")
    made = make_varied_study(tmp_path / "v", per_kind=1, size=20_000) \
        + make_ct_series(tmp_path / "ct", 3, size=6 * 1024 * 1024)      # spooled parts
    with serving(inst) as d:
        body, ctype = related_body([m.path.read_bytes() for m in made])
        r = requests.post(f"{d.base}/studies", data=body, headers={"Content-Type": ctype},
                          timeout=300)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert len(doc["00081199"]["Value"]) == len(made) and "00081198" not in doc
        again = requests.post(f"{d.base}/studies", data=body, headers={"Content-Type": ctype},
                              timeout=300)
        assert again.status_code == 200                      # duplicates: acknowledged
        # POST to one study: an instance of another study is refused, the rest stored
        ct = made[-1]
        r = requests.post(f"{d.base}/studies/{ct.study_uid}", data=body,
                          headers={"Content-Type": ctype}, timeout=300)
        assert r.status_code == 202
        assert len(r.json()["00081199"]["Value"]) == 3
        assert {f["00081197"]["Value"][0] for f in r.json()["00081198"]["Value"]} == {0xA900}

        # what dicomweb-client sends (pydicom-encoded) is stored too, and comes back
        c = DICOMwebClient(d.base)
        ds = pydicom.dcmread(made[0].path)
        ds.SOPInstanceUID = f"2.25.{uuid.uuid4().int}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        c.store_instances([ds])
        [found] = c.search_for_instances(search_filters={"SOPInstanceUID": ds.SOPInstanceUID})
        assert value(found, "00080018") == ds.SOPInstanceUID

        for m in made:
            got = requests.get(f"{d.base}/studies/{m.study_uid}/series/{m.series_uid}/"
                               f"instances/{m.sop_uid}", timeout=60)
            [(_, part)] = parts(got)
            assert after_meta(part) == dataset_bytes(m.path)
    for site in inst.settings.sites:                     # two verified copies, as C-STORE
        for m in made:
            assert list((site.path / "objects").rglob(f"{m.sop_uid}.dcm")), site.name
    rows = db(inst, "select actor, detail from audit_log where action = 'object-received'")
    assert rows and all(json.loads(r[1]).get("service") == "STOW-RS" for r in rows)
    assert {r[0] for r in db(inst, "select calling_ae from instances")} == {"STOW-RS"}


def test_hostile_stow_bodies_are_refused_and_store_nothing(tmp_path):
    inst = Install.create(tmp_path / "pv")
    inst.config.write_text(inst.config.read_text().replace(
        "[http]\n", "[http]\nstow_max_bytes = 1048576\n", 1))
    good = make_ct_series(tmp_path / "ct", 2, size=5000)
    big = make_ct_series(tmp_path / "big", 1, size=2 * 1024 * 1024)
    with serving(inst) as d:
        url = f"{d.base}/studies"
        body, ctype = related_body([good[0].path.read_bytes()])
        # no closing delimiter; a garbage part; the wrong media type; too big; no boundary
        r = requests.post(url, data=body[:-30], headers={"Content-Type": ctype}, timeout=60)
        assert r.status_code == 400
        bad, bctype = related_body([b"\x00" * 200, good[1].path.read_bytes()[:400]])
        r = requests.post(url, data=bad, headers={"Content-Type": bctype}, timeout=60)
        assert r.status_code == 409 and len(r.json()["00081198"]["Value"]) == 2
        assert requests.post(url, data=body, headers={"Content-Type": "application/json"},
                             timeout=60).status_code == 415
        assert requests.post(url, data=body, headers={"Content-Type": "multipart/related"},
                             timeout=60).status_code == 415
        huge, hctype = related_body([big[0].path.read_bytes()])
        assert requests.post(url, data=huge, headers={"Content-Type": hctype},
                             timeout=60).status_code == 413

        def chunked():  # no Content-Length: the limit must hold while streaming
            for i in range(0, len(huge), 65536):
                yield huge[i:i + 65536]
        assert requests.post(url, data=chunked(), headers={"Content-Type": hctype},
                             timeout=60).status_code == 413
        header_bomb = (b"--b\r\n" + b"X-A: " + b"a" * 70_000 + b"\r\n\r\n" + b"--b--\r\n")
        assert requests.post(url, data=header_bomb, timeout=60, headers={
            "Content-Type": "multipart/related; type=\"application/dicom\"; boundary=b"}
        ).status_code == 400
        assert requests.get(f"http://127.0.0.1:{d.http_port}/healthz", timeout=10).ok
    assert db(inst, "select count(*) from instances") == [(0,)]
    spool = inst.settings.ingest.spool_dir / "http"
    assert not [p for p in spool.rglob("*") if p.is_file()]      # nothing left behind


# -- accounts -----------------------------------------------------------------------------
def test_dicomweb_wants_an_account_whose_role_allows_it(pv):
    catalog = open_catalog(pv.settings)
    try:
        for name, role in (("ada", "admin"), ("vic", "viewer"), ("opal", "operator"),
                           ("kay", "key-custodian")):
            auth.create_user(catalog, name, role, PW, pv.settings.accounts, must_change=False)
    finally:
        catalog.close()
    ct = pv.ct[0]
    with serving(pv) as d:
        qido = f"{d.base}/studies?PatientID=PID-CT-7"
        assert requests.get(qido, timeout=30).status_code == 401
        assert requests.get(qido, auth=HTTPBasicAuth("vic", PW), timeout=60).status_code == 403
        assert requests.get(qido, auth=HTTPBasicAuth("opal", "wrong-" + PW),
                            timeout=60).status_code == 401
        r = requests.get(qido, auth=HTTPBasicAuth("kay", PW), timeout=60)
        assert r.status_code == 200 and len(r.json()) == 1
        c = DICOMwebClient(d.base, headers={"Authorization": "Basic " + base64.b64encode(
            f"opal:{PW}".encode()).decode()})
        assert len(c.retrieve_series(ct.study_uid, ct.series_uid)) == len(pv.ct)
        body, ctype = related_body([pv.ct[0].path.read_bytes()])
        assert requests.post(f"{d.base}/studies", data=body, headers={"Content-Type": ctype},
                             auth=HTTPBasicAuth("kay", PW), timeout=60).status_code == 403
        assert requests.post(f"{d.base}/studies", data=body, headers={"Content-Type": ctype},
                             auth=HTTPBasicAuth("ada", PW), timeout=60).status_code == 200
    actors = {r[0] for r in db(pv, "select actor from audit_log where action in "
                                   "('query', 'retrieve')")}
    assert {"kay", "opal"} <= actors
