"""The PS3.8 state machine (archive/dicom/net/association.py), fed bytes only."""
from __future__ import annotations

import struct

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


@pytest.mark.parametrize("kind", [P.ASSOCIATE_RQ, P.P_DATA_TF])
def test_after_aborting_for_an_oversized_pdu_what_follows_is_dropped_not_buffered(kind):
    # The header stayed at the front of the buffer, so everything the peer streamed
    # after it was kept (and answered with another A-ABORT each time) until ARTIM:
    # 48 MB per connection in the attack test, more the longer ARTIM.
    a = acceptor() if kind == P.ASSOCIATE_RQ else associated()
    a.receive_data(struct.pack(">BBI", kind, 0, 2_000_000_000) + b"\xee" * 1000)
    assert aborted_with(a) == P.INVALID_PDU_PARAMETER_VALUE
    assert [type(e) for e in a.events()] == [A.Aborted]
    for _ in range(100):
        a.receive_data(b"\xee" * 65536)
    assert not a.mid_pdu                                # nothing buffered
    assert a.data_to_send() == b"" and list(a.events()) == []     # one A-ABORT, one event
    assert a.state is A.State.AWAITING_CLOSE and a.wants_artim
    a.receive_data(b"")
    assert a.closed


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


# -- the requestor (our SCU) ---------------------------------------------------------------
CT = "1.2.840.10008.5.1.4.1.1.2"
STORE = dimse.Command(dimse.C_STORE_RQ, message_id=1, affected_sop_class=CT,
                      affected_sop_instance="1.2.3", priority=0,
                      data_set_type=dimse.DATA_SET_PRESENT)
OUR_RQ = P.AssociateRQ("PACS", "PACSVAULT", (P.PresentationContextRQ(1, CT, (IMPLICIT,)),),
                       P.UserInformation(max_length=16384, implementation_class_uid="1.2"))


def requestor(peer_max: int | None = 4096) -> A.Association:
    a = A.Association(requestor=True, max_pdu_length=16384)
    assert a.closed
    a.request_association(OUR_RQ)
    sent = P.PduDecoder(max_pdu_length=16384)
    sent.receive(a.data_to_send())
    assert sent.next_pdu() == OUR_RQ and a.state is A.State.AWAITING_AC
    a.receive_data(P.encode(P.AssociateAC("PACS", "PACSVAULT", (
        P.PresentationContextAC(1, P.ACCEPTANCE, IMPLICIT),), P.UserInformation(max_length=peer_max))))
    [ev] = list(a.events())
    assert isinstance(ev, A.Accepted) and a.state is A.State.ESTABLISHED
    return a


def sent_pdus(a: A.Association, limit: int = 1 << 24) -> list[P.Pdu]:
    d = P.PduDecoder(max_pdu_length=limit)
    d.receive(a.data_to_send())
    out = []
    while (p := d.next_pdu()) is not None:
        out.append(p)
    assert d.buffered == 0
    return out


def test_the_acceptors_maximum_pdu_length_is_kept():
    assert requestor(4096).peer_max_pdu_length == 4096
    assert requestor(0).peer_max_pdu_length == 0
    assert requestor(None).peer_max_pdu_length == 0      # no item: no limit


def test_a_rejection_is_an_event_and_closes():
    a = A.Association(requestor=True, max_pdu_length=16384)
    a.request_association(OUR_RQ)
    a.data_to_send()
    a.receive_data(P.encode(P.AssociateRJ(1, 1, 3)))
    assert list(a.events()) == [A.Rejected(P.AssociateRJ(1, 1, 3))] and a.closed


@pytest.mark.parametrize("pdu", [P.PData((P.PDV(1, True, True, b""),)), P.ReleaseRP(),
                                 P.AssociateRQ("A", "B", (), P.UserInformation())])
def test_anything_but_an_answer_to_our_request_is_aborted(pdu):
    a = A.Association(requestor=True, max_pdu_length=16384)
    a.request_association(OUR_RQ)
    a.data_to_send()
    a.receive_data(P.encode(pdu))
    assert isinstance(next(a.events()), A.Aborted)
    assert aborted_with(a) == P.UNEXPECTED_PDU


def test_an_acceptor_maximum_too_small_for_any_data_is_aborted():
    a = A.Association(requestor=True, max_pdu_length=16384)
    a.request_association(OUR_RQ)
    a.data_to_send()
    a.receive_data(P.encode(P.AssociateAC("PACS", "PACSVAULT", (), P.UserInformation(max_length=6))))
    assert isinstance(next(a.events()), A.Aborted) and a.state is A.State.AWAITING_CLOSE


@pytest.mark.parametrize("peer_max, expect_room", [(4096, 4090), (0, A.UNLIMITED_PDU_FRAGMENT - 6)])
def test_a_streamed_data_set_is_fragmented_to_the_acceptors_maximum(peer_max, expect_room):
    a = requestor(peer_max)
    data = bytes(range(256)) * 20_000               # 5 MB, sent in uneven pieces
    a.send_message(1, STORE)
    pieces = [data[:1], data[1:100_000], data[100_000:100_000], data[100_000:3_000_001],
              data[3_000_001:]]
    for i, piece in enumerate(pieces):
        a.send_data(1, piece, last=i == len(pieces) - 1)
    pdus = sent_pdus(a)
    assert all(len(P.encode(p)) - 6 <= (peer_max or A.UNLIMITED_PDU_FRAGMENT) for p in pdus)
    assert max(len(v.data) for p in pdus for v in p.pdvs) == expect_room
    events = list(dimse.MessageAssembler().feed([v for p in pdus for v in p.pdvs]))
    assert events[0] == dimse.CommandReceived(1, STORE)
    assert [e.is_last for e in events[1:]] == [False] * (len(events) - 2) + [True]
    assert b"".join(e.data for e in events[1:]) == data


def test_a_data_set_must_be_announced_and_finished():
    a = requestor()
    with pytest.raises(RuntimeError):
        a.send_data(1, b"x", last=True)               # no command announced one
    a.send_message(1, STORE)
    with pytest.raises(RuntimeError):
        a.send_data(3, b"x", last=True)               # another context
    with pytest.raises(RuntimeError):
        a.send_message(1, ECHO)                       # the data set is not finished
    with pytest.raises(RuntimeError):
        a.request_release()
    a.send_data(1, b"", last=True)
    a.send_message(1, ECHO)


def test_a_response_then_a_release():
    a = requestor()
    a.send_message(1, STORE, b"\x00" * 10)
    a.data_to_send()
    rsp = dimse.Command(dimse.C_STORE_RSP, message_id_responded_to=1, affected_sop_class=CT,
                        affected_sop_instance="1.2.3", status=0xB000)
    a.receive_data(P.encode(P.PData((P.PDV(1, True, True, dimse.encode_command(rsp)),))))
    assert list(a.events()) == [dimse.CommandReceived(1, rsp)]
    a.request_release()
    assert a.data_to_send() == P.encode(P.ReleaseRQ()) and a.state is A.State.AWAITING_RELEASE_RP
    a.receive_data(P.encode(P.ReleaseRP()))
    assert list(a.events()) == [A.Released()] and a.closed


def test_a_requestor_maximum_too_small_for_any_answer_is_aborted():
    """A C-ECHO-RSP needs a PDV of 7 bytes at least: a peer allowing fewer is aborted
    at its request, not answered with a response that cannot be fragmented."""
    a = acceptor()
    tiny = P.AssociateRQ("PACSVAULT", "SCU", RQ.contexts, P.UserInformation(max_length=6))
    a.receive_data(P.encode(tiny))
    assert isinstance(next(a.events()), A.Aborted)
    aborted_with(a)


def test_find_extended_negotiation_answers_only_what_is_supported():
    from archive.dicom.net.negotiation import find_extended
    assert find_extended(b"\x01") == b"\x01"                       # relational
    assert find_extended(b"\x01\x01\x01\x01\x01") == b"\x01\x01\x00\x00\x00"
    assert find_extended(b"\x00\x01") == b"\x00\x01"               # combined only
    assert find_extended(b"\x02\x07") == b"\x00\x00"               # not 1: not agreed
    assert find_extended(b"\x01" * 40) == b"\x01\x01\x00\x00\x00"  # at most five fields
