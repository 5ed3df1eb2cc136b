"""Audit records as DICOM audit messages (PS3.15 Annex A.5, the IHE ATNA format).

``to_xml`` turns one record of the hash-chained audit log (archive/audit.py)
into an AuditMessage; ``install`` starts a forwarder that sends the trail, in
order and from a cursor kept in the catalog (archive/atna_forwarder.py), to the
syslog collector named by ``[audit] syslog`` (archive/syslog_sender.py).

Each message also carries the record's position and chain hash (a participant
object of our own type, see ``_record_object``), so the collector holds anchors
of the chain that a database administrator cannot rewrite:
``pacsvault audit --verify --anchor ID:HASH`` checks the catalog against one.

The patient appears by ID only. A patient's name never goes into a message, not
even in ParticipantObjectName where PS3.15 allows it: the collector is often a
general-purpose SIEM that more people can read than the archive.
"""
from __future__ import annotations

import atexit
import base64
import json
import logging
import re
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from archive import audit
from archive.audit import Event
from archive.syslog_sender import SyslogSender

if TYPE_CHECKING:
    from archive.atna_forwarder import Forwarder
    from archive.config.schema import Settings
    from archive.syslog_sender import SyslogSender

log = logging.getLogger("pacsvault.atna")

Code = tuple[str, str, str]                 # (csd-code, codeSystemName, originalText)


def _dcm(code: str, meaning: str) -> Code:
    return (code, "DCM", meaning)


# EventIDs (PS3.16 CID 400) and EventTypeCodes (CID 401) used below.
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
EXPORT = _dcm("110106", "Export")
IMPORT = _dcm("110107", "Import")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")
LOGIN = _dcm("110122", "Login")
LOGOUT = _dcm("110123", "Logout")
NETWORK_CONFIGURATION = _dcm("110128", "Network Configuration")
SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
USER_SECURITY_CHANGED = _dcm("110137", "User Security Attributes Changed")
# Participant roles (CID 402) and object ID types (A.5.1.2.4, CID 404).
ROLE_APPLICATION = _dcm("110150", "Application")
ROLE_DESTINATION = _dcm("110152", "Destination Role ID")
ROLE_SOURCE = _dcm("110153", "Source Role ID")
ROLE_DESTINATION_MEDIA = _dcm("110154", "Destination Media")
ROLE_SOURCE_MEDIA = _dcm("110155", "Source Media")
PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")
STUDY_UID = _dcm("110180", "Study Instance UID")
# Our own codes ("99" prefix: a private coding scheme, PS3.16 8.2).
SCHEME = "99PACSVAULT"
AUDIT_RECORD: Code = ("audit-record", SCHEME, "pacsvault audit record")

# action -> (EventID, EventActionCode, DICOM EventTypeCodes). Every message also
# gets an EventTypeCode (action, 99PACSVAULT), which tells e.g. a recall from a retrieve.
EVENTS: dict[str, tuple[Code, str, tuple[Code, ...]]] = {
    "object-received": (INSTANCES_TRANSFERRED, "C", ()),
    "query": (QUERY, "E", ()),
    "retrieve": (INSTANCES_ACCESSED, "R", ()),
    "restore": (INSTANCES_ACCESSED, "C", ()),          # new online copies from a tier
    "recall": (INSTANCES_ACCESSED, "R", ()),
    "migration": (INSTANCES_ACCESSED, "U", ()),        # the study changes tier
    "drill": (INSTANCES_ACCESSED, "R", ()),
    "export": (EXPORT, "R", ()),
    "dr-volume-written": (EXPORT, "R", ()),
    "dr-volume-moved": (APPLICATION_ACTIVITY, "U", ()),  # see _event: export or import
    "scrub-finding": (SECURITY_ALERT, "E", ()),
    "login": (USER_AUTHENTICATION, "E", (LOGIN,)),
    "login-failed": (USER_AUTHENTICATION, "E", (LOGIN,)),
    "logout": (USER_AUTHENTICATION, "E", (LOGOUT,)),
    "user-change": (SECURITY_ALERT, "E", (USER_SECURITY_CHANGED,)),
    "peer-change": (SECURITY_ALERT, "E", (NETWORK_CONFIGURATION,)),
    "config-change": (SECURITY_ALERT, "E", (SOFTWARE_CONFIGURATION,)),
    "key-use": (SECURITY_ALERT, "E", (RESTRICTED_FUNCTION,)),
    "audit-read": (AUDIT_LOG_USED, "R", ()),
}
# A volume coming back into the library is an import; any other move takes it away.
_VOLUME_BACK = ("in-library", "returned")
# EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious failure, 12 major failure.
OUTCOMES = {"success": "0", "failure": "4", "serious": "8", "major": "12"}
# Detail keys never sent (demographics a caller might have put there by mistake).
_PHI_KEY = re.compile(r"patient_?name|birth|patient_?sex|address|phone", re.I)
MAX_DETAIL = 4096                     # bytes of detail JSON; keeps a message in one datagram
# Characters XML 1.0 cannot carry at all; etree would write them and break the document.
_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(v: object) -> str:
    return _NOT_XML.sub("\ufffd", str(v))


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    c, system, meaning = code
    return ET.SubElement(parent, tag, {"csd-code": c, "codeSystemName": system,
                                       "originalText": meaning})


def _b64(s: str) -> str:
    return base64.b64encode(s.encode("utf-8")).decode("ascii")


def _event(ev: Event) -> tuple[Code, str, tuple[Code, ...]]:
    event_id, action_code, types = EVENTS.get(ev.action, (APPLICATION_ACTIVITY, "E", ()))
    if ev.action in ("restore", "retrieve") and ev.detail.get("destination_ae"):
        return INSTANCES_TRANSFERRED, "R", types       # sent to an AE (restore, C-MOVE)
    if ev.action == "dr-volume-moved":
        if ev.detail.get("to_state") in _VOLUME_BACK:
            return IMPORT, "C", types
        return EXPORT, "R", types
    return event_id, action_code, types


def _access_point(source: str) -> tuple[str, str] | None:
    """(NetworkAccessPointID, type) from "AE@address" or a host: 2 = IP address, 1 = name."""
    addr = source.rpartition("@")[2].strip()
    addr = re.sub(r"^([0-9.]+|\[[0-9A-Fa-f:]+\]):\d+$", r"\1", addr)    # drop a :port
    if not addr:
        return None
    if re.fullmatch(r"[0-9.]+|\[?[0-9A-Fa-f:]+\]?", addr) and any(ch in addr for ch in ".:"):
        return addr.strip("[]"), "2"
    return addr, "1"


def _participant(root: ET.Element, user: str, requestor: bool, *, role: Code | None = None,
                 alt: str | None = None, nap: tuple[str, str] | None = None) -> None:
    attrs = {"UserID": _text(user) or "-", "UserIsRequestor": "true" if requestor else "false"}
    if alt:
        attrs["AlternativeUserID"] = _text(alt)
    if nap:
        attrs["NetworkAccessPointID"] = _text(nap[0])
        attrs["NetworkAccessPointTypeCode"] = nap[1]
    p = ET.SubElement(root, "ActiveParticipant", attrs)
    if role:
        _coded(p, "RoleIDCode", role)


def _detail_json(detail: dict) -> str:
    kept = {k: v for k, v in detail.items() if not _PHI_KEY.search(str(k))}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    if len(text.encode("utf-8")) > MAX_DETAIL:
        text = json.dumps({"truncated": True, "keys": sorted(map(str, kept))[:64]})
    return text


def _record_object(root: ET.Element, ev: Event, record_id: int, record_hash: str) -> None:
    """The audit record itself: its position, chain hash and detail (the anchor)."""
    o = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": str(record_id), "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "13"})            # system object, security resource
    _coded(o, "ParticipantObjectIDTypeCode", AUDIT_RECORD)
    for kind, value in (("ChainHash", record_hash), ("Action", ev.action),
                        ("Outcome", ev.outcome), ("Detail", _detail_json(ev.detail))):
        ET.SubElement(o, "ParticipantObjectDetail", {"type": kind, "value": _b64(value)})


def to_xml(event: Event, record_id: int, record_hash: str, *, host: str, ae_title: str,
           enterprise_site_id: str = "", at: datetime | None = None, pid: int | None = None) -> bytes:
    """One AuditMessage (PS3.15 A.5.1), UTF-8 with an XML declaration."""
    ev = event
    event_id, action_code, types = _event(ev)
    when = (at or datetime.now(timezone.utc)).astimezone(timezone.utc)
    root = ET.Element("AuditMessage")
    ei = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action_code,
        "EventDateTime": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "EventOutcomeIndicator": OUTCOMES.get(ev.outcome, "4")})
    _coded(ei, "EventID", event_id)
    for t in types:
        _coded(ei, "EventTypeCode", t)
    _coded(ei, "EventTypeCode", (ev.action, SCHEME, ev.action))
    if ev.outcome != "success":
        ET.SubElement(ei, "EventOutcomeDescription").text = _text(f"{ev.action}: {ev.outcome}")

    # Who did it (the requestor), then this application.
    us_role, them_role = ROLE_APPLICATION, None
    if event_id == INSTANCES_TRANSFERRED and action_code == "C":
        us_role, them_role = ROLE_DESTINATION, ROLE_SOURCE    # a peer stored to us
    elif event_id in (INSTANCES_TRANSFERRED, EXPORT):
        us_role = ROLE_SOURCE                                 # data leaves us
    elif event_id == IMPORT:
        us_role = ROLE_DESTINATION
    _participant(root, ev.actor, True, role=them_role, nap=_access_point(ev.source))
    _participant(root, ae_title, False, role=us_role, alt=str(pid) if pid else None,
                 nap=(host, "1"))
    if ev.detail.get("destination_ae") and event_id == INSTANCES_TRANSFERRED:
        _participant(root, str(ev.detail["destination_ae"]), False, role=ROLE_DESTINATION)
    if ev.detail.get("barcode") and event_id in (EXPORT, IMPORT):
        media = ROLE_DESTINATION_MEDIA if event_id == EXPORT else ROLE_SOURCE_MEDIA
        _participant(root, str(ev.detail["barcode"]), False, role=media)

    src = {"AuditSourceID": _text(host)}
    if enterprise_site_id:
        src["AuditEnterpriseSiteID"] = _text(enterprise_site_id)
    asi = ET.SubElement(root, "AuditSourceIdentification", src)
    ET.SubElement(asi, "AuditSourceTypeCode", {"csd-code": "4"})   # application server process

    if ev.patient_id:
        p = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": _text(ev.patient_id), "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1"})             # person, patient
        _coded(p, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
    if ev.study_uid:
        s = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": _text(ev.study_uid), "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})             # system object, report
        _coded(s, "ParticipantObjectIDTypeCode", STUDY_UID)
    _record_object(root, ev, record_id, record_hash)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def severity(ev: Event) -> int:
    """Syslog severity (RFC 5424): notice for success, warning for anything else."""
    return 5 if ev.outcome == "success" else 4


# -- the listener ----------------------------------------------------------------------
_active: tuple[object, "Forwarder", "SyslogSender"] | None = None


def install(settings: "Settings") -> "Forwarder | None":
    """Send the audit trail to [audit] syslog (if set), in order, from a cursor in the
    catalog (archive/atna_forwarder.py), woken by every record this process writes.

    Call once per process (CLI, daemon, each DICOM worker: they are spawned, not
    forked). A second call is a no-op; at exit, what is behind gets a few seconds to
    go out, and anything left waits in the trail for the next process."""
    global _active
    cfg = settings.audit
    if not cfg.syslog:
        return None
    if _active is not None:
        return _active[1]
    import os

    from archive.atna_forwarder import Forwarder
    from archive.catalog.engine import make_engine
    from archive.catalog.uow import Catalog

    def under(p: Path | None) -> Path | None:             # relative to data_dir, like load.py
        return p if p is None or p.is_absolute() else settings.data_dir / p

    sender = SyslogSender(cfg.syslog, ca=under(cfg.syslog_ca), cert=under(cfg.syslog_cert),
                          key=under(cfg.syslog_key), timeout_s=cfg.timeout_s,
                          queue_size=cfg.queue_size)
    host = audit.host()
    ae = cfg.ae_title or settings.dicom.ae_title

    def render(ev: Event, record_id: int, record_hash: str, at: datetime) -> tuple[bytes, int]:
        return to_xml(ev, record_id, record_hash, host=host, ae_title=ae,
                      enterprise_site_id=cfg.enterprise_site_id, at=at,
                      pid=os.getpid()), severity(ev)

    def held_back(waiting: int, held_s: float) -> None:
        from archive.alerts import Alert, send_alert
        send_alert(settings.alerts, Alert(
            "atna", "warning", f"audit messages held back: the collector {sender.where} has "
            f"been unreachable for {held_s / 60:.0f} min", counts={"records_waiting": waiting},
            details="they wait in the audit trail and go out in order when it returns; "
                    "'pacsvault status' shows how many"))

    fwd = Forwarder(lambda: Catalog(make_engine(settings.catalog.url)), sender.where, render,
                    sender.deliver, alert=held_back, held_alert_s=cfg.held_alert_s)

    def listener(ev: Event, record_id: int, record_hash: str) -> None:
        fwd.wake(record_id)

    audit.add_listener(listener)
    _active = (listener, fwd, sender)
    atexit.register(_close, cfg.timeout_s)
    return fwd


def _close(timeout: float) -> None:
    if _active is not None:
        _, fwd, sender = _active
        fwd.close(timeout)
        sender.close(0.1)


def uninstall() -> None:
    """Stop sending (tests; a reload). What is behind gets a moment to go out."""
    global _active
    if _active is None:
        return
    listener, fwd, sender = _active
    audit.remove_listener(listener)
    atexit.unregister(_close)
    _close(1.0)
    _active = None
