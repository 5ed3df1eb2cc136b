"""The DICOM Audit Message Schema (PS3.15 A.5.1.1), as data, and a checker.

The standard gives the schema in RELAX NG compact syntax. Python's standard
library cannot validate RELAX NG and we add no dependency for it, so the
grammar is transcribed here: every element with its attributes (required or
not, with their enumerations and XSD datatypes) and its children in order with
their cardinality. ``problems(xml)`` lists where a message breaks it.

One deliberate reading: the schema text requires one of ParticipantObjectName
or ParticipantObjectQuery in every ParticipantObjectIdentification, while the
message tables of A.5.3 mark both user-optional ("U"). We follow the tables,
0..1, so that the patient's name is never sent (archive/atna.py).
"""
from __future__ import annotations

import base64
import binascii
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

Check = Callable[[str], bool]


def _any(v: str) -> bool:                   # token, text
    return True


def _enum(*values: str) -> Check:
    return lambda v: v.strip() in values


def _datetime(v: str) -> bool:              # xsd:dateTime, time zone optional
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?", v.strip()):
        return False
    try:
        datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _boolean(v: str) -> bool:
    return v.strip() in ("true", "false", "1", "0")


def _base64(v: str) -> bool:
    try:
        base64.b64decode("".join(v.split()), validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _integer(v: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", v.strip()) is not None


@dataclass
class Rule:
    attrs: dict[str, tuple[bool, Check]] = field(default_factory=dict)   # name -> (required, type)
    # In order: (element names (more than one: a choice), min, max (None: unbounded), rule)
    children: list[tuple[tuple[str, ...], int, int | None, "Rule"]] = field(default_factory=list)
    text: Check | None = None               # None: no text content allowed
    extra: Callable[[ET.Element], list[str]] | None = None


CODED = Rule(attrs={"csd-code": (True, _any), "codeSystemName": (True, _any),
                    "displayName": (False, _any), "originalText": (True, _any)})


def _other_csd_together(e: ET.Element) -> list[str]:
    # AuditSourceTypeCodeContent: csd-code, then other-csd-attributes as an optional group.
    if any(a in e.attrib for a in ("codeSystemName", "displayName", "originalText")) and \
            not all(a in e.attrib for a in ("codeSystemName", "originalText")):
        return ["codeSystemName and originalText go together"]
    return []


AUDIT_SOURCE_TYPE = Rule(attrs={"csd-code": (True, _any), "codeSystemName": (False, _any),
                                "displayName": (False, _any), "originalText": (False, _any)},
                         extra=_other_csd_together)

EVENT_IDENTIFICATION = Rule(
    attrs={"EventActionCode": (False, _enum("C", "R", "U", "D", "E")),
           "EventDateTime": (True, _datetime),
           "EventOutcomeIndicator": (True, _enum("0", "4", "8", "12"))},
    children=[(("EventID",), 1, 1, CODED),
              (("EventTypeCode",), 0, None, CODED),
              (("EventOutcomeDescription",), 0, 1, Rule(text=_any))])

ACTIVE_PARTICIPANT = Rule(
    attrs={"UserID": (True, _any), "AlternativeUserID": (False, _any), "UserName": (False, _any),
           "UserIsRequestor": (True, _boolean), "NetworkAccessPointID": (False, _any),
           "NetworkAccessPointTypeCode": (False, _enum("1", "2", "3", "4", "5"))},
    children=[(("RoleIDCode",), 0, None, CODED),
              (("MediaIdentifier",), 0, 1, Rule(children=[(("MediaType",), 1, 1, CODED)]))])

AUDIT_SOURCE = Rule(
    attrs={"AuditEnterpriseSiteID": (False, _any), "AuditSourceID": (True, _any)},
    children=[(("AuditSourceTypeCode",), 0, None, AUDIT_SOURCE_TYPE)])

_UID = Rule(attrs={"UID": (True, _any)})
DICOM_OBJECT_DESCRIPTION = Rule(children=[
    (("MPPS",), 0, None, _UID),
    (("Accession",), 0, None, Rule(attrs={"Number": (True, _any)})),
    (("SOPClass",), 0, None, Rule(attrs={"UID": (False, _any),
                                         "NumberOfInstances": (True, _integer)},
                                  children=[(("Instance",), 0, None, _UID)])),
    (("ParticipantObjectContainsStudy",), 0, 1,
     Rule(children=[(("StudyIDs",), 0, None, _UID)])),
    (("Encrypted",), 0, 1, Rule(text=_boolean)),
    (("Anonymized",), 0, 1, Rule(text=_boolean)),
])

PARTICIPANT_OBJECT = Rule(
    attrs={"ParticipantObjectID": (True, _any),
           "ParticipantObjectTypeCode": (False, _enum("1", "2", "3", "4")),
           "ParticipantObjectTypeCodeRole": (False, _enum(*map(str, range(1, 27)))),
           "ParticipantObjectDataLifeCycle": (False, _enum(*map(str, range(1, 16)))),
           "ParticipantObjectSensitivity": (False, _any)},
    children=[(("ParticipantObjectIDTypeCode",), 1, 1, CODED),
              # ParticipantObjectName is a token, ParticipantObjectQuery base64; the choice
              # rule is shared, so the Query's content is checked in _name_or_query.
              (("ParticipantObjectName", "ParticipantObjectQuery"), 0, 1, Rule(text=_any)),
              (("ParticipantObjectDetail",), 0, None,
               Rule(attrs={"type": (True, _any), "value": (True, _base64)})),
              (("ParticipantObjectDescription",), 0, None, DICOM_OBJECT_DESCRIPTION)],
    extra=lambda e: ["ParticipantObjectQuery: not base64" for q in e.findall(
        "ParticipantObjectQuery") if not _base64(q.text or "")])

AUDIT_MESSAGE = Rule(children=[
    (("EventIdentification",), 1, 1, EVENT_IDENTIFICATION),
    (("ActiveParticipant",), 1, None, ACTIVE_PARTICIPANT),
    (("AuditSourceIdentification",), 1, 1, AUDIT_SOURCE),
    (("ParticipantObjectIdentification",), 0, None, PARTICIPANT_OBJECT),
])


def _check(e: ET.Element, rule: Rule, path: str, out: list[str]) -> None:
    for name, value in e.attrib.items():
        if name not in rule.attrs:
            out.append(f"{path}/@{name}: attribute not in the schema")
        elif not rule.attrs[name][1](value):
            out.append(f"{path}/@{name}: {value!r} is not a valid value")
    for name, (required, _) in rule.attrs.items():
        if required and name not in e.attrib:
            out.append(f"{path}/@{name}: required attribute missing")
    if rule.text is None:
        if (e.text or "").strip():
            out.append(f"{path}: text where the schema has none")
    elif not rule.text(e.text or ""):
        out.append(f"{path}: {e.text!r} is not a valid value")
    kids = list(e)
    for k in kids:
        if (k.tail or "").strip():
            out.append(f"{path}: text after {k.tag} where the schema has none")
    i = 0
    for names, lo, hi, child_rule in rule.children:
        n = 0
        while i < len(kids) and kids[i].tag in names and (hi is None or n < hi):
            _check(kids[i], child_rule, f"{path}/{kids[i].tag}", out)
            i, n = i + 1, n + 1
        if n < lo:
            found = kids[i].tag if i < len(kids) else "the end"
            out.append(f"{path}: expected {' or '.join(names)}, found {found}")
    for k in kids[i:]:
        out.append(f"{path}/{k.tag}: element not allowed here")
    if rule.extra:
        out.extend(f"{path}: {p}" for p in rule.extra(e))


def problems(xml: bytes | str) -> list[str]:
    """Where ``xml`` breaks the DICOM Audit Message Schema; [] when it is valid."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        return [f"not well-formed XML: {e}"]
    if root.tag != "AuditMessage":
        return [f"the root element is {root.tag}, not AuditMessage"]
    out: list[str] = []
    _check(root, AUDIT_MESSAGE, "/AuditMessage", out)
    return out
