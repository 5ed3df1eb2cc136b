"""The sans-I/O DICOM codecs (archive/dicom/net), fed bytes only: round trips,
an independent implementation (pynetdicom, pydicom) on the other side, limits
that refuse before allocating, and a fuzzer over both parsers."""
from __future__ import annotations

import io
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive.dicom.net import dimse
from archive.dicom.net import pdu as P

# No per-example deadline or speed health check: a loaded CI machine must not fail these
# on time. Under CI the examples are derandomized, so a run is reproducible; on a
# developer's machine each run explores new ones.
settings.register_profile("pacsvault", deadline=None, derandomize=bool(os.environ.get("CI")),
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("pacsvault")

CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"

# Built from parts, not regexes: far cheaper to generate, so more examples per second.
uids = st.lists(st.integers(0, 10**9), min_size=1, max_size=8).map(
    lambda xs: "1." + ".".join(map(str, xs)))
aes = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", min_size=1, max_size=16)
u16 = st.integers(0, 0xFFFF)

user_infos = st.builds(
    P.UserInformation,
    max_length=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    implementation_class_uid=uids,
    implementation_version_name=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", max_size=16),
    async_ops=st.one_of(st.none(), st.tuples(u16, u16)),
    roles=st.lists(st.builds(P.RoleSelection, uids, st.booleans(), st.booleans()),
                   max_size=3).map(tuple),
    extended=st.lists(st.tuples(uids, st.binary(max_size=8)), max_size=2).map(tuple),
    common_extended=st.lists(st.tuples(uids, uids, st.lists(uids, max_size=2).map(tuple)),
                             max_size=2).map(tuple),
    user_identity=st.one_of(st.none(), st.builds(P.UserIdentityRQ, st.integers(1, 5),
                                                 st.booleans(), st.binary(max_size=20),
                                                 st.binary(max_size=20))),
)
contexts_rq = st.lists(st.builds(P.PresentationContextRQ, st.integers(0, 127).map(lambda n: 2 * n + 1),
                                 uids, st.lists(uids, min_size=1, max_size=4).map(tuple)),
                       max_size=8).map(tuple)
associate_rqs = st.builds(P.AssociateRQ, aes, aes, contexts_rq, user_infos)
associate_acs = st.builds(
    P.AssociateAC, aes, aes,
    st.lists(st.builds(P.PresentationContextAC, st.integers(1, 255), st.sampled_from([0, 1, 2, 3, 4]),
                       uids), max_size=8).map(tuple),
    user_infos.map(lambda u: P.UserInformation(**{**u.__dict__, "user_identity": None,
                                                  "user_identity_response": b"ok"})))
pdvs = st.builds(P.PDV, st.integers(1, 255), st.booleans(), st.booleans(), st.binary(max_size=64))
simple_pdus = st.one_of(
    st.builds(P.AssociateRJ, st.integers(1, 2), st.integers(1, 3), st.integers(0, 7)),
    st.builds(P.PData, st.lists(pdvs, min_size=1, max_size=4).map(tuple)),
    st.just(P.ReleaseRQ()), st.just(P.ReleaseRP()),
    st.builds(P.Abort, st.sampled_from([0, 2]), st.integers(0, 6)))
all_pdus = st.one_of(associate_rqs, associate_acs, simple_pdus)


def decoded(raw: bytes, **limits: int) -> list:
    d = P.PduDecoder(max_pdu_length=limits.get("max_pdu_length", 1 << 20))
    d.receive(raw)
    out = []
    while (p := d.next_pdu()) is not None:
        out.append(p)
    assert d.buffered == 0
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(all_pdus)
def test_every_pdu_survives_a_round_trip(pdu):
    assert decoded(P.encode(pdu)) == [pdu]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(all_pdus, min_size=1, max_size=4), st.integers(1, 17))
def test_pdus_arriving_in_any_pieces_come_out_whole_and_in_order(pdus, step):
    raw = b"".join(P.encode(p) for p in pdus)
    d = P.PduDecoder(max_pdu_length=1 << 20)
    out = []
    for i in range(0, len(raw), step):
        d.receive(raw[i:i + step])
        while (p := d.next_pdu()) is not None:
            out.append(p)
    assert out == pdus and d.buffered == 0


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_any_bytes_give_pdus_or_a_protocol_error_and_nothing_else(raw):
    d = P.PduDecoder(max_pdu_length=4096, max_associate_length=4096)
    d.receive(raw)
    try:
        while d.next_pdu() is not None:
            pass
    except P.ProtocolError as e:
        assert e.reason in (0, 1, 2, 4, 5, 6)
    assert d.buffered <= 4096 + 6


@settings(max_examples=600, deadline=None)
@given(all_pdus, st.data())
def test_fuzz_a_mutated_pdu_never_crashes_the_parser(pdu, data):
    # Structure-aware: start from a valid PDU, then flip bytes, cut it short or add
    # a tail, so the parser gets past the header checks random bytes rarely pass.
    raw = bytearray(P.encode(pdu)[6:])
    for _ in range(data.draw(st.integers(0, 4))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    body = bytes(raw[:cut]) + data.draw(st.binary(max_size=5))
    try:
        P.decode(P.encode(pdu)[0], body)
    except P.ProtocolError:
        pass


def test_an_announced_2_gb_pdu_is_refused_from_its_header_alone():
    # pynetdicom read the whole announced length into memory before anything else.
    for kind, limit in ((P.P_DATA_TF, 16384), (P.ASSOCIATE_RQ, P.MAX_ASSOCIATE_LENGTH)):
        d = P.PduDecoder(max_pdu_length=16384)
        d.receive(struct.pack(">BBI", kind, 0, 2_000_000_000))
        with pytest.raises(P.ProtocolError, match="announces 2000000000 bytes"):
            d.next_pdu()
        assert d.buffered == 6
        d = P.PduDecoder(max_pdu_length=16384)
        d.receive(struct.pack(">BBI", kind, 0, limit))      # exactly the limit: waits for it
        assert d.next_pdu() is None


def test_an_unknown_pdu_type_and_a_long_release_are_protocol_errors():
    with pytest.raises(P.ProtocolError) as e:
        decoded(b"\x09\x00\x00\x00\x00\x04abcd")
    assert e.value.reason == P.UNRECOGNIZED_PDU
    with pytest.raises(P.ProtocolError):
        decoded(P.HEADER.pack(P.RELEASE_RQ, 0, 8) + b"\x00" * 8)


def _pynetdicom_rq() -> bytes:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        AsynchronousOperationsWindowNegotiation,
        ImplementationClassUIDNotification,
        ImplementationVersionNameNotification,
        MaximumLengthNotification,
        SCP_SCU_RoleSelectionNegotiation,
        UserIdentityNegotiation,
    )
    from pynetdicom.presentation import build_context

    p = A_ASSOCIATE()
    p.application_context_name = P.DICOM_APPLICATION_CONTEXT
    p.calling_ae_title, p.called_ae_title = "MODALITY", "PACSVAULT"
    cx = build_context(CT, [IMPLICIT, EXPLICIT])
    cx.context_id = 3
    p.presentation_context_definition_list = [cx]
    m = MaximumLengthNotification()
    m.maximum_length_received = 16384
    i = ImplementationClassUIDNotification()
    i.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.2.0.2"
    v = ImplementationVersionNameNotification()
    v.implementation_version_name = "PYNETDICOM_2"
    r = SCP_SCU_RoleSelectionNegotiation()
    r.sop_class_uid, r.scu_role, r.scp_role = CT, False, True
    a = AsynchronousOperationsWindowNegotiation()
    a.maximum_number_operations_invoked, a.maximum_number_operations_performed = 5, 3
    u = UserIdentityNegotiation()
    u.user_identity_type, u.positive_response_requested = 2, True
    u.primary_field, u.secondary_field = b"operator", b"secret"
    p.user_information = [m, i, v, r, a, u]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(p)
    return rq.encode()


def test_pynetdicoms_associate_request_reads_as_sent():
    [rq] = decoded(_pynetdicom_rq())
    assert (rq.called_ae, rq.calling_ae) == ("PACSVAULT", "MODALITY")
    assert rq.contexts == (P.PresentationContextRQ(3, CT, (IMPLICIT, EXPLICIT)),)
    u = rq.user
    assert u.max_length == 16384 and u.implementation_version_name == "PYNETDICOM_2"
    assert u.implementation_class_uid == "1.2.826.0.1.3680043.9.3811.2.0.2"
    assert u.roles == (P.RoleSelection(CT, False, True),) and u.async_ops == (5, 3)
    assert u.user_identity == P.UserIdentityRQ(2, True, b"operator", b"secret")


def test_our_associate_accept_reads_in_pynetdicom_as_sent():
    from pynetdicom.pdu import A_ASSOCIATE_AC

    ac = P.AssociateAC("PACSVAULT", "MODALITY",
                       (P.PresentationContextAC(3, P.ACCEPTANCE, EXPLICIT),
                        P.PresentationContextAC(5, P.ABSTRACT_SYNTAX_NOT_SUPPORTED, IMPLICIT)),
                       P.UserInformation(max_length=65536, implementation_class_uid="1.2.3.4",
                                         implementation_version_name="PACSVAULT_1",
                                         roles=(P.RoleSelection(CT, False, True),),
                                         async_ops=(1, 1)))
    pdu = A_ASSOCIATE_AC()
    pdu.decode(P.encode(ac))
    prim = pdu.to_primitive()
    got = {c.context_id: (c.result, c.transfer_syntax) for c in prim.presentation_context_definition_results_list}
    assert got[3] == (0, [EXPLICIT]) and got[5][0] == 3
    names = {type(x).__name__: x for x in prim.user_information}
    assert names["MaximumLengthNotification"].maximum_length_received == 65536
    assert names["ImplementationClassUIDNotification"].implementation_class_uid == "1.2.3.4"
    assert names["ImplementationVersionNameNotification"].implementation_version_name == "PACSVAULT_1"
    role = names["SCP_SCU_RoleSelectionNegotiation"]
    assert (role.sop_class_uid, role.scu_role, role.scp_role) == (CT, False, True)


# -- DIMSE ---------------------------------------------------------------------------------
commands = st.builds(
    dimse.Command,
    command_field=st.sampled_from([0x0001, 0x8001, 0x0010, 0x8010, 0x0020, 0x8020, 0x0021,
                                   0x8021, 0x0030, 0x8030, 0x0FFF]),
    message_id=st.one_of(st.none(), u16), message_id_responded_to=st.one_of(st.none(), u16),
    affected_sop_class=st.one_of(st.none(), uids), affected_sop_instance=st.one_of(st.none(), uids),
    priority=st.one_of(st.none(), st.sampled_from([0, 1, 2])),
    data_set_type=st.sampled_from([dimse.NO_DATA_SET, dimse.DATA_SET_PRESENT]),
    status=st.one_of(st.none(), u16), move_destination=st.one_of(st.none(), aes),
    error_comment=st.one_of(st.none(), st.text("abcXYZ019 ", max_size=40).map(lambda t: t.strip() or "x")),
    remaining=st.one_of(st.none(), u16), completed=st.one_of(st.none(), u16),
    failed=st.one_of(st.none(), u16), warning=st.one_of(st.none(), u16),
    offending_element=st.one_of(st.none(), st.lists(st.integers(0, 2**32 - 1), min_size=1,
                                                    max_size=3).map(tuple)))


@settings(max_examples=300, deadline=None)
@given(commands)
def test_every_command_survives_a_round_trip(cmd):
    assert dimse.decode_command(dimse.encode_command(cmd)) == cmd


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_bytes_give_a_command_or_a_protocol_error(raw):
    try:
        dimse.decode_command(raw)
    except P.ProtocolError:
        pass


@settings(max_examples=600, deadline=None)
@given(commands, st.data())
def test_fuzz_a_mutated_command_set_never_crashes_the_parser(cmd, data):
    raw = bytearray(dimse.encode_command(cmd))
    for _ in range(data.draw(st.integers(0, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    body = bytes(raw[:data.draw(st.integers(0, len(raw)))]) + data.draw(st.binary(max_size=9))
    try:
        dimse.decode_command(body)
    except P.ProtocolError:
        pass


def _read_implicit(raw: bytes):
    from pydicom.filereader import read_dataset

    return read_dataset(io.BytesIO(raw), is_implicit_VR=True, is_little_endian=True)


def test_our_command_set_reads_in_pydicom_and_pydicoms_reads_in_ours():
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    cmd = dimse.Command(dimse.C_STORE_RQ, message_id=7, affected_sop_class=CT, priority=0,
                        data_set_type=dimse.DATA_SET_PRESENT, affected_sop_instance="1.2.3.45",
                        move_originator_ae="MOVER", move_originator_message_id=3)
    ds = _read_implicit(dimse.encode_command(cmd))
    assert ds.CommandField == 1 and ds.MessageID == 7 and ds.AffectedSOPClassUID == CT
    assert ds.AffectedSOPInstanceUID == "1.2.3.45" and ds.MoveOriginatorApplicationEntityTitle == "MOVER"
    assert ds.CommandGroupLength == len(dimse.encode_command(cmd)) - 12

    theirs = Dataset()
    theirs.CommandGroupLength = 0
    theirs.AffectedSOPClassUID = CT
    theirs.CommandField = 0x8001
    theirs.MessageIDBeingRespondedTo = 7
    theirs.CommandDataSetType = 0x0101
    theirs.Status = 0xA700
    theirs.ErrorComment = "Out of resources"
    theirs.AffectedSOPInstanceUID = "1.2.3.45"
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = True, True
    write_dataset(buf, theirs)
    got = dimse.decode_command(buf.getvalue())
    assert (got.command_field, got.status, got.error_comment) == (0x8001, 0xA700, "Out of resources")
    assert got.message_id_responded_to == 7 and not got.has_data_set


def test_a_command_set_out_of_order_outside_group_0000_or_too_long_is_refused():
    good = dimse.encode_command(dimse.Command(dimse.C_ECHO_RQ, message_id=1))
    swapped = good[:12] + good[-10:] + good[12:-10]                   # two elements swapped
    for bad in (swapped, good + struct.pack("<HHI", 8, 0x18, 0),
                good[:-1], b"\x00" * (dimse.MAX_COMMAND_LENGTH + 1)):
        with pytest.raises(P.ProtocolError):
            dimse.decode_command(bad)


def test_messages_assemble_from_fragments_and_misplaced_ones_are_refused():
    cmd = dimse.Command(dimse.C_STORE_RQ, message_id=1, affected_sop_class=CT,
                        affected_sop_instance="1.2.3", priority=0,
                        data_set_type=dimse.DATA_SET_PRESENT)
    data = bytes(range(256)) * 40
    pdvs = list(dimse.fragments(1, dimse.encode_command(cmd), is_command=True, max_pdu_length=40)) \
        + list(dimse.fragments(1, data, is_command=False, max_pdu_length=1000))
    assert all(len(v.data) <= 34 for v in pdvs if v.is_command)
    assert all(len(v.data) <= 994 for v in pdvs if not v.is_command)
    a = dimse.MessageAssembler()
    events = [e for v in pdvs for e in a.feed([v])]
    assert events[0] == dimse.CommandReceived(1, cmd)
    assert b"".join(e.data for e in events[1:]) == data and events[-1].is_last and a.idle

    with pytest.raises(P.ProtocolError, match="without a command"):
        list(dimse.MessageAssembler().feed([P.PDV(1, False, True, b"x")]))
    with pytest.raises(P.ProtocolError, match="two presentation contexts"):
        list(dimse.MessageAssembler().feed(pdvs[:1] + [P.PDV(3, True, True, b"")]))
    a = dimse.MessageAssembler()
    list(a.feed([v for v in pdvs if v.is_command]))
    with pytest.raises(P.ProtocolError, match="inside a data set"):
        list(a.feed(pdvs[:1]))
