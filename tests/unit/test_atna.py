"""Audit records as DICOM audit messages (PS3.15 A.5) sent to real syslog listeners."""
from __future__ import annotations

import base64
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from archive import atna, audit
from archive.atna_schema import problems
from archive.audit import Event
from archive.config.syslog_url import parse_url
from archive.syslog_sender import SyslogSender
from tests.support.pki import make_pki
from tests.support.tiering import Install

PATIENT = "PID-0042"
STUDY = "1.2.826.0.1.3680043.8.498.1"
# RFC 5424: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD SP MSG
RFC5424 = re.compile(rb"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-) (.*)", re.S)


def xml_for(ev: Event, record_id: int = 7, h: str = "ab" * 32) -> bytes:
    return atna.to_xml(ev, record_id, h, host="pv-host", ae_title="PACSVAULT",
                       enterprise_site_id="HOSP-1", pid=1234)


def objects(root: ET.Element) -> dict[str, ET.Element]:
    """ParticipantObjectIdentification by its ID type code."""
    return {o.find("ParticipantObjectIDTypeCode").get("csd-code"): o
            for o in root.findall("ParticipantObjectIdentification")}


def details(obj: ET.Element) -> dict[str, str]:
    return {d.get("type"): base64.b64decode(d.get("value")).decode()
            for d in obj.findall("ParticipantObjectDetail")}


# -- the message ------------------------------------------------------------------------
@pytest.mark.parametrize("action", audit.ACTIONS)
def test_every_action_gives_a_schema_valid_message(action: str) -> None:
    ev = Event(action, actor="alice", source="STORESCU@10.1.2.3", patient_id=PATIENT,
               study_uid=STUDY, detail={"n": 3})
    xml = xml_for(ev)
    assert problems(xml) == []
    root = ET.fromstring(xml)
    assert root.find("EventIdentification/EventID").get("codeSystemName") == "DCM"
    assert root.find("EventIdentification").get("EventOutcomeIndicator") == "0"


@pytest.mark.parametrize("action,event_id,action_code", [
    ("object-received", "110104", "C"), ("retrieve", "110103", "R"), ("recall", "110103", "R"),
    ("restore", "110103", "C"), ("export", "110106", "R"), ("query", "110112", "E"),
    ("login", "110114", "E"), ("logout", "110114", "E"), ("login-failed", "110114", "E"),
    ("scrub-finding", "110113", "E"), ("config-change", "110113", "E"),
    ("key-use", "110113", "E"), ("user-change", "110113", "E"), ("peer-change", "110113", "E"),
    ("audit-read", "110101", "R"),
])
def test_event_codes(action: str, event_id: str, action_code: str) -> None:
    ei = ET.fromstring(xml_for(Event(action))).find("EventIdentification")
    assert (ei.find("EventID").get("csd-code"), ei.get("EventActionCode")) == (event_id, action_code)
    types = {(t.get("csd-code"), t.get("codeSystemName")) for t in ei.findall("EventTypeCode")}
    assert (action, "99PACSVAULT") in types


def test_login_logout_and_volume_moves_are_specialised() -> None:
    def types(ev: Event) -> set[str]:
        ei = ET.fromstring(xml_for(ev)).find("EventIdentification")
        return {t.get("csd-code") for t in ei.findall("EventTypeCode")} | \
            {"id:" + ei.find("EventID").get("csd-code")}

    assert "110122" in types(Event("login")) and "110123" in types(Event("logout"))
    assert "id:110104" in types(Event("restore", detail={"destination_ae": "VIEWER"}))
    assert "id:110106" in types(Event("dr-volume-moved", detail={"to_state": "offsite",
                                                                 "barcode": "PV0001L9"}))
    assert "id:110107" in types(Event("dr-volume-moved", detail={"to_state": "in-library"}))


def test_failures_are_flagged() -> None:
    ei = ET.fromstring(xml_for(Event("login-failed", "failure", "mallory"))).find(
        "EventIdentification")
    assert ei.get("EventOutcomeIndicator") == "4"
    assert ei.find("EventOutcomeDescription").text
    assert ET.fromstring(xml_for(Event("scrub-finding", "serious"))).find(
        "EventIdentification").get("EventOutcomeIndicator") == "8"


def test_patient_and_study_participants() -> None:
    root = ET.fromstring(xml_for(Event("retrieve", actor="VIEWER", source="VIEWER@10.0.0.9",
                                       patient_id=PATIENT, study_uid=STUDY)))
    obj = objects(root)
    pat, study = obj["2"], obj["110180"]
    assert (pat.get("ParticipantObjectID"), pat.get("ParticipantObjectTypeCode"),
            pat.get("ParticipantObjectTypeCodeRole")) == (PATIENT, "1", "1")
    assert pat.find("ParticipantObjectIDTypeCode").get("originalText") == "Patient Number"
    assert (study.get("ParticipantObjectID"), study.get("ParticipantObjectTypeCode"),
            study.get("ParticipantObjectTypeCodeRole")) == (STUDY, "2", "3")
    assert study.find("ParticipantObjectIDTypeCode").get("codeSystemName") == "DCM"
    requestor = [p for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    assert [(p.get("UserID"), p.get("NetworkAccessPointID"), p.get("NetworkAccessPointTypeCode"))
            for p in requestor] == [("VIEWER", "10.0.0.9", "2")]
    src = root.find("AuditSourceIdentification")
    assert (src.get("AuditSourceID"), src.get("AuditEnterpriseSiteID")) == ("pv-host", "HOSP-1")


def test_no_patient_objects_without_a_patient() -> None:
    root = ET.fromstring(xml_for(Event("config-change", actor="root")))
    assert set(objects(root)) == {"audit-record"}


def test_the_record_position_and_chain_hash_travel_with_the_message() -> None:
    root = ET.fromstring(xml_for(Event("recall", patient_id=PATIENT), 4711, "cd" * 32))
    rec = objects(root)["audit-record"]
    assert rec.get("ParticipantObjectID") == "4711"
    assert details(rec)["ChainHash"] == "cd" * 32


def test_no_patient_name_anywhere() -> None:
    ev = Event("export", actor="bob", patient_id=PATIENT, study_uid=STUDY,
               detail={"patient_name": "DOE^JANE", "PatientName": "DOE^JANE",
                       "birth_date": "19700101", "count": 2})
    xml = xml_for(ev)
    assert problems(xml) == []
    assert b"DOE" not in xml and b"19700101" not in xml
    rec_detail = details(objects(ET.fromstring(xml))["audit-record"])["Detail"]
    assert "DOE" not in rec_detail and '"count":2' in rec_detail
    assert ET.fromstring(xml).find(".//ParticipantObjectName") is None


def test_special_characters_are_escaped() -> None:
    nasty = 'a<b>&"c\'</UserID><x y="1"/>\x00\x1b]\u00e9'
    ev = Event("login-failed", "failure", nasty, f"{nasty}@host", patient_id=nasty,
               study_uid=STUDY, detail={"why": nasty})
    xml = xml_for(ev)
    assert problems(xml) == []
    root = ET.fromstring(xml)            # parses: nothing injected, no illegal characters
    assert root.find("ActiveParticipant").get("UserID") == nasty.replace("\x00", "\ufffd") \
        .replace("\x1b", "\ufffd")
    assert objects(root)["2"].get("ParticipantObjectID").startswith('a<b>&"c')
    assert root.find(".//x") is None


def test_the_checker_finds_broken_messages() -> None:
    good = xml_for(Event("retrieve", patient_id=PATIENT))

    def broken(edit) -> list[str]:  # noqa: ANN001
        root = ET.fromstring(good)
        edit(root)
        return problems(ET.tostring(root))

    assert broken(lambda r: r.find("EventIdentification").remove(
        r.find("EventIdentification/EventID")))
    assert broken(lambda r: r.find("EventIdentification").set("EventOutcomeIndicator", "1"))
    assert broken(lambda r: r.find("EventIdentification").set("EventDateTime", "yesterday"))
    assert broken(lambda r: r.find("ActiveParticipant").attrib.pop("UserIsRequestor"))
    assert broken(lambda r: r.remove(r.find("AuditSourceIdentification")))
    assert broken(lambda r: r.append(ET.Element("Extra")))
    assert broken(lambda r: r.find(".//ParticipantObjectDetail").set("value", "not base64!"))
    assert broken(lambda r: r.find("ParticipantObjectIdentification")
                  .set("ParticipantObjectTypeCode", "9"))
    assert broken(lambda r: r.insert(0, r.find("AuditSourceIdentification")))   # out of order
    assert problems(b"<AuditMessage><oops") and problems(b"<Other/>")


# -- transport ---------------------------------------------------------------------------
def test_collector_urls() -> None:
    assert parse_url("udp://10.0.0.1:514") == ("udp", "10.0.0.1", 514)
    assert parse_url("tls://[::1]:6514") == ("tls", "::1", 6514)
    for bad in ("tcp://h:1", "udp://h", "tls://:6514", "udp://h:1/x", "h:514"):
        with pytest.raises(ValueError):
            parse_url(bad)


def parse_syslog(data: bytes) -> tuple[int, bytes, ET.Element]:
    m = RFC5424.fullmatch(data)
    assert m, data[:200]
    pri, stamp, host, app, procid, msgid, _, msg = m.groups()
    assert app == b"pacsvault" and msgid == b"IHE+RFC-3881" and procid.isdigit()
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
    assert msg.startswith(b"\xef\xbb\xbf")
    xml = msg[3:]
    assert problems(xml) == []
    return int(pri), xml, ET.fromstring(xml)


@pytest.fixture
def pv(tmp_path: Path):  # noqa: ANN201
    made: list[Install] = []

    def make(audit_toml: str) -> Install:
        inst = Install.create(tmp_path / f"pv{len(made)}", toml_extra="[audit]\n" + audit_toml)
        audit.configure(inst.settings.data_dir)      # as the CLI and the daemon do
        made.append(inst)
        return inst

    yield make
    atna.uninstall()


def test_udp_collector_receives_the_message(pv) -> None:  # noqa: ANN001
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(10)
    inst = pv(f'syslog = "udp://127.0.0.1:{rx.getsockname()[1]}"\nenterprise_site_id = "HOSP-1"\n')
    settings = inst.settings
    sender = atna.install(settings)
    assert atna.install(settings) is sender          # a second call adds no second listener
    catalog = inst.catalog()
    try:
        rid = audit.record(catalog, Event("retrieve", actor="VIEWER", source="VIEWER@127.0.0.1",
                                          patient_id=PATIENT, study_uid=STUDY))
        data, _ = rx.recvfrom(65535)
        pri, xml, root = parse_syslog(data)
        assert pri == 10 * 8 + 5
        rec = objects(root)["audit-record"]
        assert rec.get("ParticipantObjectID") == str(rid)
        head = audit.verify(catalog)["head"]
        assert details(rec)["ChainHash"] == head["hash"] and head["id"] == rid
        assert objects(root)["2"].get("ParticipantObjectID") == PATIENT
        assert root.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") == "HOSP-1"
        assert audit.verify(catalog, anchor=(rid, details(rec)["ChainHash"]))["ok"]

        audit.record(catalog, Event("login-failed", "failure", "mallory", "10.9.9.9"))
        data, _ = rx.recvfrom(65535)                 # one message per datagram
        assert parse_syslog(data)[0] == 10 * 8 + 4
        assert sender.flush(5) and sender.stats()["sent"] == 2
    finally:
        catalog.close()
        rx.close()


class TlsCollector:
    """A syslog-over-TLS listener (RFC 5425): octet-counted frames, one thread per connection."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        if client_ca:
            self.ctx.load_verify_locations(client_ca)
            self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.frames: list[bytes] = []
        self.connections = 0
        self.close_after_first = False
        self.got = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.connections += 1
        buf = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except (ssl.SSLError, OSError):
                    return
                if not chunk:
                    return
                buf += chunk
                while b" " in buf:
                    length, _, rest = buf.partition(b" ")
                    assert length.isdigit(), buf[:40]
                    if len(rest) < int(length):
                        break
                    with self.got:
                        self.frames.append(rest[:int(length)])
                        self.got.notify_all()
                    buf = rest[int(length):]
                    if self.close_after_first:
                        return

    def wait(self, n: int, timeout: float = 10) -> list[bytes]:
        with self.got:
            assert self.got.wait_for(lambda: len(self.frames) >= n, timeout), self.frames
            return list(self.frames)

    def close(self) -> None:
        self.sock.close()


def test_tls_collector_receives_messages_and_the_sender_reconnects(pv, tmp_path: Path) -> None:  # noqa: ANN001
    pki = make_pki(tmp_path / "pki")
    col = TlsCollector(pki.server_cert, pki.server_key, client_ca=pki.ca)   # mutual TLS
    inst = pv(f'syslog = "tls://localhost:{col.port}"\nsyslog_ca = "{pki.ca}"\n'
              f'syslog_cert = "{pki.client_cert}"\nsyslog_key = "{pki.client_key}"\n')
    sender = atna.install(inst.settings)
    catalog = inst.catalog()
    try:
        rid = audit.record(catalog, Event("object-received", actor="STORESCU",
                                          source="STORESCU@127.0.0.1", patient_id=PATIENT,
                                          study_uid=STUDY))
        _, _, root = parse_syslog(col.wait(1)[0])
        assert objects(root)["audit-record"].get("ParticipantObjectID") == str(rid)
        assert root.find("EventIdentification/EventID").get("csd-code") == "110104"

        audit.record(catalog, Event("query", actor="STORESCU"))
        col.wait(2)
        assert col.connections == 1                  # one connection kept open

        col.close_after_first = True                 # the collector restarts: the connection drops
        audit.record(catalog, Event("recall", patient_id=PATIENT))
        col.wait(3)
        time.sleep(0.2)
        col.close_after_first = False
        audit.record(catalog, Event("restore", patient_id=PATIENT))
        frames = col.wait(4)
        assert col.connections == 2
        assert [parse_syslog(f)[2].find("EventIdentification/EventTypeCode[@codeSystemName="
                                        "'99PACSVAULT']").get("csd-code") for f in frames] == \
            ["object-received", "query", "recall", "restore"]
        assert sender.stats()["dropped"] == 0
    finally:
        catalog.close()
        col.close()


def test_tls_refuses_a_collector_our_ca_did_not_sign(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    theirs, ours = make_pki(tmp_path / "theirs"), make_pki(tmp_path / "ours")
    col = TlsCollector(theirs.server_cert, theirs.server_key)
    sender = SyslogSender(f"tls://localhost:{col.port}", ca=ours.ca, timeout_s=2)
    try:
        assert sender.submit(xml_for(Event("retrieve", patient_id=PATIENT)))
        assert not sender.flush(1.5)
        assert col.frames == [] and sender.stats()["failed_attempts"] >= 1
        assert PATIENT not in caplog.text             # failures are logged without PHI
        assert "unreachable" in caplog.text
    finally:
        sender.close(0.1)
        col.close()


def test_an_unreachable_collector_never_fails_the_work(pv, caplog) -> None:  # noqa: ANN001
    with socket.socket() as s:                       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pki_free = f'syslog = "tls://127.0.0.1:{port}"\nsyslog_ca = "ca.pem"\n'   # the CA file is absent too
    inst = pv(pki_free + "timeout_s = 1\nqueue_size = 3\n")
    sender = atna.install(inst.settings)
    catalog = inst.catalog()
    try:
        t0 = time.monotonic()
        ids = [audit.record(catalog, Event("retrieve", patient_id=PATIENT)) for _ in range(6)]
        assert time.monotonic() - t0 < 2             # the caller does not wait for the collector
        assert ids == list(range(ids[0], ids[0] + 6))
        assert audit.verify(catalog)["ok"]
        time.sleep(0.5)
        st = sender.stats()
        assert st["failing"] and st["failed_attempts"] >= 1 and st["sent"] == 0
        # Nothing is dropped: the six wait in the trail itself, in order, for the collector.
        assert st["dropped"] == 0 and st["behind"] == 6
        assert PATIENT not in caplog.text
    finally:
        catalog.close()


def test_close_gives_up_on_an_absent_collector(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = SyslogSender(f"tls://127.0.0.1:{port}", ca=tmp_path / "none.pem", timeout_s=1)
    sender.submit(b"<AuditMessage/>")
    t0 = time.monotonic()
    sender.close(0.5)
    assert time.monotonic() - t0 < 3
    assert sender.stats()["dropped"] == 1
    assert not sender.submit(b"<AuditMessage/>")      # closed: dropped, not raised


def test_an_outage_that_lasts_raises_one_alert_and_loses_nothing(pv) -> None:  # noqa: ANN001
    """The forwarder alerts once per outage that lasts [audit] held_alert_s, with the
    count waiting; the records themselves wait in the trail."""
    from archive.atna_forwarder import Forwarder
    inst = pv('syslog = "udp://127.0.0.1:9"\n')
    alerts: list[tuple[int, float]] = []

    def down(msg: bytes, severity: int) -> None:
        raise ConnectionRefusedError("collector down")

    sent: list[bytes] = []
    fwd = Forwarder(inst.catalog, "tls://collector:6514",
                    lambda ev, rid, h, at: (xml_for(ev, rid, h), 5), down,
                    alert=lambda n, s: alerts.append((n, s)), held_alert_s=0.6)
    catalog = inst.catalog()
    try:
        def wake(ev: Event, rid: int, h: str) -> None:
            fwd.wake(rid)

        audit.add_listener(wake)
        for _ in range(3):
            audit.record(catalog, Event("query", actor="VIEWER"))
        time.sleep(2.5)
        assert len(alerts) == 1 and alerts[0][0] == 3 and alerts[0][1] >= 0.6
        assert fwd.stats()["behind"] == 3 and fwd.stats()["sent"] == 0
        fwd.send = lambda msg, severity: sent.append(msg)           # the collector returns
        assert fwd.flush(15) and len(sent) == 3
    finally:
        audit.remove_listener(wake)
        fwd.close(1)
        catalog.close()
