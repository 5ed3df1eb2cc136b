"""The C-FIND use case: an identifier in, the response identifiers out, audited.

The listener hands over the request's SOP class, transfer syntax and identifier
bytes; this decodes them (archive/dicom/identifier.py), matches them against the
catalog (archive/catalog/query.py) and returns either a refusal status or the
matches, each already encoded for the presentation context. Every query, answered
or refused, is one audit record (action "query", sent on as an ATNA Query
message; the caller writes it with ``FindAnswer.record`` after the answer is sent): who asked, from where, the model, level and keys asked (never their
values, except the Patient ID, which the audit trail is the place for), how many
matched.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

from archive import audit
from archive.catalog import query as Q
from archive.catalog.uow import Catalog
from archive.dicom import identifier as ident

log = logging.getLogger("pacsvault.query")

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
MODELS = {PATIENT_ROOT_FIND: Q.PATIENT_ROOT, STUDY_ROOT_FIND: Q.STUDY_ROOT}

# C-FIND statuses (PS3.4 C.4.1.1.4)
SUCCESS, PENDING, CANCELLED = 0x0000, 0xFF00, 0xFE00
OUT_OF_RESOURCES = 0xA700          # refused: more matches than the cap
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
CATALOG_UNAVAILABLE = 0xC001


@dataclass
class FindAnswer:
    status: int                                 # SUCCESS (then the matches) or a failure
    comment: str = ""                           # Error Comment for a failure: no values
    matches: Iterator[bytes] = iter(())         # response identifiers, encoded
    count: int = 0
    # The audit record, written by ``record`` once the answer is out (a committed row
    # is a disk flush: the requestor need not wait for it).
    record: Callable[[], None] = lambda: None


class FindService:
    def __init__(self, catalog: Catalog, *, ae_title: str, max_matches: int,
                 case_insensitive_pn: bool = True) -> None:
        self.catalog, self.ae_title = catalog, ae_title
        self.max_matches, self.case_insensitive_pn = max_matches, case_insensitive_pn

    def find(self, sop_class: str, transfer_syntax: str, data: bytes, *, calling_ae: str,
             source: str, combined_datetime: bool = False,
             relational: bool = False) -> FindAnswer:
        model = MODELS.get(sop_class)
        request: ident.Identifier | None = None
        try:
            if model is None:
                raise Q.IdentifierInvalid("not a C-FIND information model we offer")
            request = ident.decode(data, transfer_syntax)
            matches = Q.find(self.catalog, request.level, model, request.keys,
                             max_matches=self.max_matches,
                             case_insensitive_pn=self.case_insensitive_pn,
                             combined_datetime=combined_datetime, relational=relational)
        except ident.IdentifierUnreadable as e:
            answer = FindAnswer(UNABLE_TO_PROCESS, str(e))
        except Q.IdentifierInvalid as e:
            answer = FindAnswer(IDENTIFIER_DOES_NOT_MATCH, str(e))
        except Q.TooManyMatches as e:
            answer = FindAnswer(OUT_OF_RESOURCES, str(e))
        except Q.QueryError as e:
            answer = FindAnswer(UNABLE_TO_PROCESS, str(e))
        except Exception as e:  # noqa: BLE001 - the catalog unreachable, or a bug: refuse
            log.error("C-FIND from %s failed: %s", calling_ae, type(e).__name__)
            answer = FindAnswer(CATALOG_UNAVAILABLE, "the catalog cannot be read now")
        else:
            answer = FindAnswer(SUCCESS, count=len(matches),
                                matches=self._encoded(matches, request, transfer_syntax))
        if answer.status != SUCCESS:
            log.warning("C-FIND from %s refused, status 0x%04X: %s", source, answer.status,
                        answer.comment)
        answer.record = functools.partial(self._audit, sop_class, request, answer, calling_ae,
                                          source)
        return answer

    def _encoded(self, matches: Q.Matches, request: ident.Identifier, transfer_syntax: str
                 ) -> Iterator[bytes]:
        # RetrieveAETitle: where a C-MOVE for this match goes (us), if it was asked for.
        extra = {"RetrieveAETitle": self.ae_title} if "RetrieveAETitle" in request.keys else {}
        for match in matches:
            yield ident.encode(match, request.level, transfer_syntax,
                               character_set=request.character_set, extra=extra)

    def _audit(self, sop_class: str, request: ident.Identifier | None, answer: FindAnswer,
               calling_ae: str, source: str) -> None:
        keys = request.keys if request is not None else {}
        audit.record_quietly(self.catalog, audit.Event(
            "query", "success" if answer.status == SUCCESS else "failure", calling_ae, source,
            patient_id=_single(keys.get("PatientID")), study_uid=_single(keys.get("StudyInstanceUID")),
            detail={"sop_class": sop_class, "level": request.level if request else "",
                    "keys": sorted(keys)[:64], "matches": answer.count,
                    "status": f"0x{answer.status:04X}"}))


def _single(value: str | None) -> str | None:
    """A key's value when it names one entity (no wildcard, no list), else None."""
    if not value or any(c in value for c in "*?\\"):
        return None
    return value[:64]
