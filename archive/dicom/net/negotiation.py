"""The acceptor's answer to an A-ASSOCIATE-RQ (PS3.8 9.3.3, PS3.7 annex D), pure.

Which contexts are accepted and with which transfer syntax, which roles, what
we say about ourselves; or why the whole request is rejected. The calling AE
and source address are the caller's decision (the allow-list), made before
this is asked.
"""
from __future__ import annotations

from dataclasses import dataclass

from archive.dicom.net import pdu as P

# A-ASSOCIATE-RJ (PS3.8 Table 9-21)
REJECTED_PERMANENT, REJECTED_TRANSIENT = 1, 2
SOURCE_USER, SOURCE_ACSE, SOURCE_PRESENTATION = 1, 2, 3
NO_REASON, APPLICATION_CONTEXT_NOT_SUPPORTED = 1, 2
CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED = 3, 7
PROTOCOL_VERSION_NOT_SUPPORTED = 2          # source ACSE
TEMPORARY_CONGESTION, LOCAL_LIMIT_EXCEEDED = 1, 2   # source presentation


@dataclass(frozen=True)
class Offer:
    """What this acceptor supports."""
    ae_title: str
    abstract_syntaxes: frozenset[str] | None     # None: any (every storage class, retired
                                                 # and private ones too)
    transfer_syntaxes: tuple[str, ...]       # every one we can keep as received
    max_pdu_length: int
    implementation_class_uid: str
    implementation_version_name: str
    # SOP classes for which we may act as SCU on this association (C-GET's C-STOREs);
    # None: any the requestor offers to receive.
    scu_role_classes: frozenset[str] | None = frozenset()
    # Query/retrieve models: their identifiers carry no pixel data, so a context for
    # one is accepted only in one of these (uncompressed or deflated) syntaxes.
    query_classes: frozenset[str] = frozenset()
    query_transfer_syntaxes: tuple[str, ...] = ()
    # C-FIND models whose SOP Class Extended Negotiation (PS3.4 C.5.1.1) we answer:
    # relational queries and combined date-time matching, as the requestor asks.
    find_classes: frozenset[str] = frozenset()


# C-FIND extended negotiation fields we support, by position (PS3.4 Table C.5-1):
# 0 relational queries, 1 combined date and time matching. Fuzzy semantic matching of
# person names (2), timezone adjustment (3) and enhanced multi-frame conversion (4)
# are answered 0: not supported.
FIND_EXTENDED_SUPPORTED = (True, True)


def find_extended(info: bytes) -> bytes:
    """Our answer to a requestor's C-FIND extended negotiation: each field it asked for
    (1) that we support stays 1, every other is 0; the same length, at most 5 fields."""
    return bytes(1 if b == 1 and i < len(FIND_EXTENDED_SUPPORTED)
                 and FIND_EXTENDED_SUPPORTED[i] else 0 for i, b in enumerate(info[:5]))


def valid_ae_title(title: str) -> bool:
    """PS3.5 AE: 16 characters of the default repertoire, no control characters or
    backslash; leading and trailing spaces are not significant (the codec strips them)."""
    return 0 < len(title) <= 16 and all(" " <= c <= "~" and c != "\\" for c in title)


def answer(rq: P.AssociateRQ, offer: Offer) -> P.AssociateAC | P.AssociateRJ:
    if not valid_ae_title(rq.calling_ae):
        return P.AssociateRJ(REJECTED_PERMANENT, SOURCE_USER, CALLING_AE_NOT_RECOGNIZED)
    if not valid_ae_title(rq.called_ae):
        return P.AssociateRJ(REJECTED_PERMANENT, SOURCE_USER, CALLED_AE_NOT_RECOGNIZED)
    if not rq.protocol_version & 1:
        return P.AssociateRJ(REJECTED_PERMANENT, SOURCE_ACSE, PROTOCOL_VERSION_NOT_SUPPORTED)
    if rq.application_context != P.DICOM_APPLICATION_CONTEXT:
        return P.AssociateRJ(REJECTED_PERMANENT, SOURCE_USER, APPLICATION_CONTEXT_NOT_SUPPORTED)
    supported = set(offer.transfer_syntaxes)
    contexts = []
    for c in rq.contexts:
        if offer.abstract_syntaxes is not None and c.abstract_syntax not in offer.abstract_syntaxes:
            contexts.append(P.PresentationContextAC(c.id, P.ABSTRACT_SYNTAX_NOT_SUPPORTED, ""))
            continue
        # The requestor's order is its preference; any one we accept keeps the bytes as sent.
        usable = (set(offer.query_transfer_syntaxes) if c.abstract_syntax in offer.query_classes
                  else supported)
        chosen = next((t for t in c.transfer_syntaxes if t in usable), None)
        contexts.append(P.PresentationContextAC(c.id, P.ACCEPTANCE, chosen) if chosen else
                        P.PresentationContextAC(c.id, P.TRANSFER_SYNTAXES_NOT_SUPPORTED, ""))
    proposed = {c.abstract_syntax for c in rq.contexts}
    roles = tuple(
        # SCU role: the requestor may always use the services it proposes; SCP role
        # (it receives C-STOREs from us) only where we may be SCU.
        P.RoleSelection(r.sop_class, r.scu, r.scp and (offer.scu_role_classes is None
                                                       or r.sop_class in offer.scu_role_classes))
        for r in rq.user.roles if r.sop_class in proposed)
    accepted = {c.abstract_syntax for c, a in zip(rq.contexts, contexts)
                if a.result == P.ACCEPTANCE}
    extended = tuple((sop, find_extended(info)) for sop, info in rq.user.extended
                     if sop in offer.find_classes and sop in accepted and info)
    user = P.UserInformation(
        max_length=offer.max_pdu_length,
        implementation_class_uid=offer.implementation_class_uid,
        implementation_version_name=offer.implementation_version_name,
        # One operation at a time each way: we answer each request before the next.
        async_ops=(1, 1) if rq.user.async_ops is not None else None,
        roles=roles, extended=extended)
    return P.AssociateAC(rq.called_ae, rq.calling_ae, tuple(contexts), user)
