"""The DICOM upper layer and DIMSE messages (watcher/dicomnet.py), checked against the
layouts of PS3.7, PS3.8 and PS3.10 and against pynetdicom's and pydicom's own codecs."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from io import BytesIO
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    P_DATA,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context

from watcher import dicomnet as dn
from watcher.dicomnet import ProtocolError, negotiate, pdvs

SUPPORTED = dn.supported_contexts()
PEER_UID = "1.2.826.0.1.3680043.9.7433.1"
ODD_UID = "1.2.3.456"  # odd length: NUL-padded on the wire (PS3.5 9.1)


def request(contexts: Sequence[tuple[str, Sequence[str]]], *, calling: str = "MODALITY",
            app_context: str = dn.APPLICATION_CONTEXT, version: int = 1,
            roles: tuple[tuple[str, bool, bool], ...] = ()) -> bytes:
    """An A-ASSOCIATE-RQ body (the PDU after its 6-byte header), encoded by pynetdicom;
    context ids 1, 3, 5..."""
    prim = A_ASSOCIATE()
    prim.application_context_name = UID(app_context)
    prim.calling_ae_title, prim.called_ae_title = calling, "HUB"
    cxs = [build_context(abstract, list(syntaxes)) for abstract, syntaxes in contexts]
    for number, cx in enumerate(cxs):
        cx.context_id = 2 * number + 1
    prim.presentation_context_definition_list = cxs
    info: list[Any] = [MaximumLengthNotification(), ImplementationClassUIDNotification(),
                       ImplementationVersionNameNotification()]
    info[0].maximum_length_received = 16384
    info[1].implementation_class_uid = UID(PEER_UID)
    info[2].implementation_version_name = "PEER_1"
    for sop_class, scu, scp in roles:
        item = SCP_SCU_RoleSelectionNegotiation()
        item.sop_class_uid, item.scu_role, item.scp_role = UID(sop_class), scu, scp
        info.append(item)
    prim.user_information = info
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(prim)
    rq.protocol_version = version
    raw = rq.encode()
    assert raw[0] == dn.ASSOCIATE_RQ and struct.unpack(">I", raw[2:6])[0] == len(raw) - 6
    return raw[6:]


def accept(body: bytes, allowed: list[str] | None = None) -> tuple[A_ASSOCIATE, dn.Association]:
    """Negotiate, expecting an A-ASSOCIATE-AC; return it decoded by pynetdicom."""
    answer, association = negotiate(body, SUPPORTED, allowed or [], busy=False)
    assert answer[0] == dn.ASSOCIATE_AC and association is not None
    ac = A_ASSOCIATE_AC()
    ac.decode(answer)
    return ac.to_primitive(), association


def results(ac: A_ASSOCIATE) -> dict[Any, tuple[Any, str]]:
    return {cx.context_id: (cx.result, cx.transfer_syntax[0])
            for cx in ac.presentation_context_definition_results_list}


def user_item(ac: A_ASSOCIATE, kind: type) -> list[Any]:
    return [item for item in ac.user_information if isinstance(item, kind)]


# negotiate() ----------------------------------------------------------------------------


def test_storage_and_verification_are_accepted_and_unknown_abstract_syntaxes_rejected() -> None:
    ac, association = accept(request([(CTImageStorage, [JPEGBaseline8Bit,
                                                        ExplicitVRLittleEndian]),
                                      ("1.2.3.4", [ImplicitVRLittleEndian]),
                                      (dn.VERIFICATION, [ImplicitVRLittleEndian])]))
    got = results(ac)
    assert got[1] == (0, JPEGBaseline8Bit)  # the peer's first choice: stored as sent
    assert got[3][0] == 3  # abstract syntax not supported (PS3.8 9.3.3.2)
    assert got[5] == (0, ImplicitVRLittleEndian)
    assert association.contexts == {1: (CTImageStorage, got[1][1]),
                                    5: (dn.VERIFICATION, ImplicitVRLittleEndian)}
    assert association.rejected == [3]


def test_a_single_proposed_compressed_syntax_is_accepted_and_an_unknown_one_refused() -> None:
    ac, association = accept(request([(CTImageStorage, [JPEGBaseline8Bit]),
                                      (CTImageStorage, ["1.2.3.4.5.6"]),
                                      (CTImageStorage, [ImplicitVRLittleEndian])]))
    assert results(ac) == {1: (0, JPEGBaseline8Bit), 3: (4, "1.2.3.4.5.6"),  # 4: no syntax
                           5: (0, ImplicitVRLittleEndian)}
    assert association.contexts == {1: (CTImageStorage, JPEGBaseline8Bit),
                                    5: (CTImageStorage, ImplicitVRLittleEndian)}
    assert association.rejected == [3]


def test_accept_carries_our_limits_and_identity_and_records_the_peers() -> None:
    ac, association = accept(request([(CTImageStorage, [ExplicitVRLittleEndian])],
                                     calling="MODALITY  "))
    assert str(ac.application_context_name) == dn.APPLICATION_CONTEXT
    assert (ac.calling_ae_title.strip(), ac.called_ae_title.strip()) == ("MODALITY", "HUB")
    [max_length] = user_item(ac, MaximumLengthNotification)
    [uid] = user_item(ac, ImplementationClassUIDNotification)
    [version] = user_item(ac, ImplementationVersionNameNotification)
    assert max_length.maximum_length_received == dn.MAX_PDU
    assert uid.implementation_class_uid == dn.IMPLEMENTATION_UID
    assert version.implementation_version_name == dn.IMPLEMENTATION_VERSION
    assert 1 <= len(dn.IMPLEMENTATION_VERSION) <= 16  # SH, PS3.7 D.3.3.2
    assert (association.calling_ae, association.called_ae) == ("MODALITY", "HUB")
    assert association.peer_max_pdu == 16384
    assert (association.implementation_uid, association.implementation_version) == (
        PEER_UID, "PEER_1")


@pytest.mark.parametrize("scu, scp", [(True, True), (True, False), (False, True)])
def test_role_selection_keeps_storage_accepted_and_replies_only_as_allowed(
        scu: bool, scp: bool) -> None:
    ac, association = accept(request([(CTImageStorage, [ExplicitVRLittleEndian])],
                                     roles=((CTImageStorage, scu, scp),)))
    assert association.contexts == {1: (CTImageStorage, ExplicitVRLittleEndian)}
    # PS3.7 D.3.3.4: a reply is optional (absent: requestor SCU, acceptor SCP), but one
    # must name a proposed class and never return 1 for a role that was not proposed.
    for reply in user_item(ac, SCP_SCU_RoleSelectionNegotiation):
        assert reply.sop_class_uid == CTImageStorage
        assert (scu or not reply.scu_role) and (scp or not reply.scp_role)


def test_no_role_items_are_returned_when_none_were_proposed() -> None:
    ac, _ = accept(request([(CTImageStorage, [ExplicitVRLittleEndian])]))
    assert user_item(ac, SCP_SCU_RoleSelectionNegotiation) == []


@pytest.mark.parametrize("allowed, app_context, version, busy, expected", [
    (["OTHER"], dn.APPLICATION_CONTEXT, 1, False, b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x03"),
    ([], "1.2.3.4", 1, False, b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x02"),
    ([], dn.APPLICATION_CONTEXT, 1, True, b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02"),
    ([], dn.APPLICATION_CONTEXT, 2, False, b"\x03\x00\x00\x00\x00\x04\x00\x01\x02\x02"),
])
def test_rejections_are_exact_a_associate_rj_pdus(
        allowed: list[str], app_context: str, version: int, busy: bool, expected: bytes) -> None:
    body = request([(CTImageStorage, [ExplicitVRLittleEndian])], app_context=app_context,
                   version=version)
    answer, association = negotiate(body, SUPPORTED, allowed, busy)
    assert (answer, association) == (expected, None)
    rj = A_ASSOCIATE_RJ()
    rj.decode(answer)
    assert (rj.result, rj.source, rj.reason_diagnostic) == tuple(expected[7:])


def test_any_calling_ae_is_allowed_by_an_empty_list_and_titles_compare_unpadded() -> None:
    body = request([(CTImageStorage, [ExplicitVRLittleEndian])], calling="MODALITY")
    assert accept(request([(CTImageStorage, [ExplicitVRLittleEndian])], calling="ANY"))[1]
    assert accept(body, allowed=["  MODALITY  ", "OTHER"])[1].calling_ae == "MODALITY"
    assert negotiate(body, SUPPORTED, ["MODALITY2"], False) == (dn.reject(dn.REJECT_CALLING_AE),
                                                                None)


@pytest.mark.parametrize("cut", [0, 1, 2, 80, -3])
def test_truncated_requests_raise_protocol_error(cut: int) -> None:
    body = request([(CTImageStorage, [ExplicitVRLittleEndian])])
    with pytest.raises(ProtocolError):
        negotiate(body[:cut], SUPPORTED, [], False)


def test_garbage_requests_raise_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        negotiate(b"\xff" * 80, SUPPORTED, [], False)


# P-DATA-TF ------------------------------------------------------------------------------

PAYLOAD = bytes(i * 7 % 251 for i in range(10_000))


@pytest.mark.parametrize("max_pdu", [0, 50, 1000, 4096, 10_006, 16384])
@pytest.mark.parametrize("command", [True, False])
def test_p_data_fragments_fit_the_max_pdu_and_reassemble(max_pdu: int, command: bool) -> None:
    pdus = dn.p_data(5, command, PAYLOAD, max_pdu)
    room = max_pdu - 6 if max_pdu else len(PAYLOAD)
    assert len(pdus) == -(-len(PAYLOAD) // room)
    fragments = []
    for number, raw in enumerate(pdus):
        kind, length = dn.PDU_HEADER.unpack_from(raw)
        assert kind == dn.P_DATA_TF and length == len(raw) - 6
        assert max_pdu == 0 or length <= max_pdu
        decoded = P_DATA_TF()
        decoded.decode(raw)  # PS3.8 9.3.5, as pynetdicom reads it
        [item] = decoded.presentation_data_value_items
        control = (item.presentation_data_value or b"?")[0]
        assert item.presentation_context_id == 5
        assert control == int(command) | (2 if number == len(pdus) - 1 else 0)
        [(context, header, fragment)] = list(pdvs(raw[6:]))
        assert (context, header) == (5, control)
        fragments.append(bytes(fragment))
    assert b"".join(fragments) == PAYLOAD


def test_an_empty_payload_is_one_last_fragment() -> None:
    assert dn.p_data(1, True, b"", 0) == [b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x02\x01\x03"]


def test_pdvs_yields_every_value_of_a_p_data_tf() -> None:
    prim = P_DATA()
    values: Any = [[1, b"\x03cmd"], [3, b"\x00data1"], [3, b"\x02"]]
    prim.presentation_data_value_list = values
    tf = P_DATA_TF()
    tf.from_primitive(prim)
    got = [(c, h, bytes(f)) for c, h, f in pdvs(tf.encode()[6:])]
    assert got == [(1, 3, b"cmd"), (3, 0, b"data1"), (3, 2, b"")]


@pytest.mark.parametrize("body", [
    b"\x00\x00\x00",  # shorter than an item header
    b"\x00\x00\x00\x05\x01\x03ab",  # claims 5 bytes, has 4
    b"\x00\x00\x00\x01\x01\x03",  # too short for context id and control header
    b"\x00\x00\x00\x03\x01\x03a\x00\x00\x00",  # a good item, then a stray partial one
])
def test_pdvs_rejects_truncated_and_overlong_items(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        list(pdvs(body))


# DIMSE command sets ---------------------------------------------------------------------


def c_store_rq() -> bytes:
    prim = C_STORE()
    prim.MessageID, prim.Priority = 7, 2
    prim.AffectedSOPClassUID, prim.AffectedSOPInstanceUID = CTImageStorage, UID(ODD_UID)
    prim.MoveOriginatorApplicationEntityTitle, prim.MoveOriginatorMessageID = "MOVER", 3
    prim.DataSet = BytesIO(b"")
    message = C_STORE_RQ()
    message.primitive_to_message(prim)
    raw = encode(message.command_set, True, True)
    assert raw is not None
    return raw


def test_decode_command_reads_a_pynetdicom_c_store_rq() -> None:
    raw = c_store_rq()
    assert ODD_UID.encode() + b"\0" in raw
    assert dn.decode_command(raw) == {
        dn.AFFECTED_SOP_CLASS: CTImageStorage, dn.COMMAND_FIELD: dn.C_STORE_RQ,
        dn.MESSAGE_ID: 7, 0x00000700: 2, dn.DATA_SET_TYPE: 1,
        dn.AFFECTED_SOP_INSTANCE: ODD_UID, 0x00001030: "MOVER", 0x00001031: 3}


def test_decode_command_reads_a_pydicom_c_echo_rq_and_skips_other_tags() -> None:
    ds = Dataset()
    ds.CommandGroupLength = 0  # not checked by the reader
    ds.AffectedSOPClassUID = dn.VERIFICATION
    ds.CommandField, ds.MessageID, ds.CommandDataSetType = dn.C_ECHO_RQ, 65535, dn.NO_DATA_SET
    ds.MoveDestination = "ELSEWHERE"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    assert dn.decode_command(fp.getvalue()) == {
        dn.AFFECTED_SOP_CLASS: dn.VERIFICATION, dn.COMMAND_FIELD: dn.C_ECHO_RQ,
        dn.MESSAGE_ID: 65535, dn.DATA_SET_TYPE: dn.NO_DATA_SET}


@pytest.mark.parametrize("cut", [4, 20, -1])
def test_decode_command_rejects_truncated_sets(cut: int) -> None:
    with pytest.raises(ProtocolError):
        dn.decode_command(c_store_rq()[:cut])


def test_c_store_rsp_decodes_with_pynetdicom() -> None:
    raw = dn.encode_response(dn.C_STORE_RSP, 7, dn.SUCCESS, CTImageStorage, ODD_UID)
    ds = decode(BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12  # the bytes after its own element
    assert [int(tag) & 0xFFFF for tag in ds.keys()] == [0, 0x2, 0x100, 0x120, 0x800, 0x900, 0x1000]
    assert (ds.CommandField, ds.CommandDataSetType) == (0x8001, 0x0101)
    message = C_STORE_RSP()
    message.command_set = ds
    prim: Any = message.message_to_primitive()
    assert (prim.MessageIDBeingRespondedTo, prim.Status) == (7, 0)
    assert (prim.AffectedSOPClassUID, prim.AffectedSOPInstanceUID) == (CTImageStorage, ODD_UID)
    assert ODD_UID.encode() + b"\0" in raw


def test_a_response_without_uids_has_only_the_required_elements() -> None:
    raw = dn.encode_response(0x8FFF, 9, dn.UNRECOGNISED_OPERATION)
    ds = decode(BytesIO(raw), True, True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert "AffectedSOPClassUID" not in ds and "AffectedSOPInstanceUID" not in ds
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8FFF, 9, 0x0211)


# file meta information ------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_file_meta_prepended_to_a_data_set_reads_back_with_pydicom(syntax: str) -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ODD_UID
    ds.PatientName, ds.PatientID, ds.Rows = "Doe^Jane", "ID1", 2
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    meta = dn.file_meta(CTImageStorage, ODD_UID, syntax, "MOD01")
    assert meta[:132] == bytes(128) + b"DICM"
    assert ODD_UID.encode() + b"\0" in meta and b"MOD01 " in meta  # UI: NUL, AE: space
    read = pydicom.dcmread(BytesIO(meta + fp.getvalue()))
    fm = read.file_meta
    assert fm.FileMetaInformationGroupLength == len(meta) - 132 - 12
    assert fm.FileMetaInformationVersion == b"\x00\x01"
    assert (fm.TransferSyntaxUID, fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID) == (
        syntax, CTImageStorage, ODD_UID)
    assert (fm.ImplementationClassUID, fm.ImplementationVersionName) == (
        dn.IMPLEMENTATION_UID, dn.IMPLEMENTATION_VERSION)
    assert fm.SourceApplicationEntityTitle == "MOD01"
    assert read == ds


def test_file_meta_without_a_source_ae_omits_the_element() -> None:
    meta = dn.file_meta(CTImageStorage, ODD_UID, ExplicitVRLittleEndian, "")
    fm = pydicom.dcmread(BytesIO(meta + b"\x08\x00\x18\x00UI\x02\x001\x00")).file_meta
    assert "SourceApplicationEntityTitle" not in fm
    assert fm.FileMetaInformationGroupLength == len(meta) - 144


# other PDUs -----------------------------------------------------------------------------


def test_abort_reject_and_release_rp_have_the_standard_layouts() -> None:
    assert dn.abort() == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"
    assert dn.abort(dn.ABORT_UNEXPECTED_PDU) == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x02"
    assert dn.abort(0, source=0) == b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    decoded = A_ABORT_RQ()
    decoded.decode(dn.abort(dn.ABORT_INVALID_PARAMETER))
    assert (decoded.source, decoded.reason_diagnostic) == (2, 6)
    assert dn.reject((1, 2, 3)) == b"\x03\x00\x00\x00\x00\x04\x00\x01\x02\x03"
    assert dn.RELEASE_RP_PDU == b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
