"""The PS3.8 state machine (archive/dicom/net/association.py), fed bytes only."""
from __future__ import annotations

import pytest

from archive.dicom.net import association as A
from archive.dicom.net import dimse
from archive.dicom.net import pdu as P
from archive.dicom.net.negotiation import Offer, answer

VERIFICATION, IMPLICIT = "1.2.840.10008.1.1", "1.2.840.10008.1.2"
OFFER = Offer("PACSVAULT", frozenset({VERIFICATION}), (IMPLICIT,), 16384, "1.2.3", "PV")
RQ = P.AssociateRQ("PACSVAULT", "SCU", (P.PresentationContextRQ(1, VERIFICATION, (IMPLICIT,)),),
                   P.UserInformation(max_length=8192, implementation_class_uid="1.2"))
ECHO = dimse.Command(dimse.C_ECHO_RQ, message_id=1, affected_sop_class=VERIFICATION)


def acceptor() -> A.Association:
    return A.Association(requestor=False, max_pdu_length=16384)


def associated() -> A.Association:
    a = acceptor()
    a.receive_data(P.encode(RQ))
    [ev] = list(a.events())
    a.accept(answer(ev.request, OFFER))
    a.data_to_send()
    return a


def aborted_with(a: A.Association) -> int:
    out = a.data_to_send()
    assert out[:1] == bytes([P.ABORT]) and a.state is A.State.AWAITING_CLOSE
    return out[-1]


@pytest.mark.parametrize("pdu", [P.PData((P.PDV(1, True, True, b""),)), P.ReleaseRQ(),
                                 P.AssociateAC("A", "B", ()), P.ReleaseRP()])
def test_anything_but_a_request_before_association_is_aborted(pdu):
    a = acceptor()
    a.receive_data(P.encode(pdu) if not isinstance(pdu, P.AssociateAC) else
                   P.encode(P.AssociateAC("A", "B", (), P.UserInformation())))
    assert aborted_with(a) == P.UNEXPECTED_PDU
    assert isinstance(next(a.events()), A.Aborted)


def test_a_second_request_while_the_first_awaits_an_answer_is_aborted():
    a = acceptor()
    a.receive_data(P.encode(RQ) + P.encode(RQ))
    events = list(a.events())
    assert isinstance(events[0], A.AssociationRequested) and isinstance(events[1], A.Aborted)
    assert aborted_with(a) == P.UNEXPECTED_PDU


def test_an_echo_then_a_release():
    a = associated()
    cmd = dimse.encode_command(ECHO)
    a.receive_data(P.encode(P.PData((P.PDV(1, True, True, cmd),))))
    [ev] = list(a.events())
    assert ev == dimse.CommandReceived(1, ECHO)
    a.send_message(1, dimse.Command(dimse.C_ECHO_RSP, message_id_responded_to=1, status=0))
    d = P.PduDecoder(max_pdu_length=1 << 20)
    d.receive(a.data_to_send())
    [got] = list(dimse.MessageAssembler().feed(d.next_pdu().pdvs))
    assert got.command.command_field == dimse.C_ECHO_RSP and got.command.status == 0
    a.receive_data(P.encode(P.ReleaseRQ()))
    assert isinstance(next(a.events()), A.ReleaseRequested)
    a.release()
    assert a.data_to_send() == P.encode(P.ReleaseRP()) and a.wants_artim
    a.receive_data(b"")
    assert a.closed


def test_a_release_in_the_middle_of_a_message_is_aborted():
    a = associated()
    cmd = dimse.encode_command(ECHO)
    a.receive_data(P.encode(P.PData((P.PDV(1, True, False, cmd[:10]),))) + P.encode(P.ReleaseRQ()))
    list(a.events())
    assert aborted_with(a) == P.UNEXPECTED_PDU


def test_our_messages_are_fragmented_to_the_peers_maximum():
    a = associated()                       # the peer said 8192
    a.send_message(1, dimse.Command(dimse.C_STORE_RQ, message_id=2, affected_sop_class="1.2",
                                    affected_sop_instance="1.2.3", priority=0,
                                    data_set_type=dimse.DATA_SET_PRESENT), b"\x01" * 100_000)
    d = P.PduDecoder(max_pdu_length=8192)
    d.receive(a.data_to_send())
    pdus = []
    while (p := d.next_pdu()) is not None:
        pdus.append(p)
    assert len(pdus) == 1 + -(-100_000 // (8192 - 6))
    assert sum(len(v.data) for p in pdus[1:] for v in p.pdvs) == 100_000


def test_a_peer_abort_closes_at_once_and_says_who():
    a = associated()
    a.receive_data(P.encode(P.Abort(0, 0)))
    [ev] = list(a.events())
    assert ev == A.Aborted(0, 0, by_us=False) and a.closed and a.data_to_send() == b""


def test_negotiation_rejects_another_application_context_and_protocol_version():
    rj = answer(P.AssociateRQ("X", "Y", (), P.UserInformation(), application_context="1.2.3"), OFFER)
    assert isinstance(rj, P.AssociateRJ) and rj.reason == 2
    rj = answer(P.AssociateRQ("X", "Y", (), P.UserInformation(), protocol_version=2), OFFER)
    assert isinstance(rj, P.AssociateRJ) and rj.source == 2


@pytest.mark.parametrize("calling, called, reason", [
    ("BAD\x1bAE", "PACSVAULT", 3), ("NEW\nLINE", "PACSVAULT", 3), ("BACK\\SLASH", "PACSVAULT", 3),
    ("", "PACSVAULT", 3), ("SCU", "PACS\x00VAULT", 7)])
def test_ae_titles_with_control_characters_are_rejected(calling, called, reason):
    rj = answer(P.AssociateRQ(called, calling, RQ.contexts, RQ.user), OFFER)
    assert isinstance(rj, P.AssociateRJ) and rj.reason == reason


def test_ae_titles_compare_without_their_padding():
    a = acceptor()
    a.receive_data(P.encode(P.AssociateRQ("  PACSVAULT ", " SCU  ", RQ.contexts, RQ.user)))
    [ev] = list(a.events())
    assert (ev.request.called_ae, ev.request.calling_ae) == ("PACSVAULT", "SCU")
    assert isinstance(answer(ev.request, OFFER), P.AssociateAC)
