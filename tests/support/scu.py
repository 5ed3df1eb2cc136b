"""A pynetdicom SCU for hostile and fault tests: sends arbitrary bytes as a data set.

dcmtk's storescu re-encodes or refuses what it cannot parse; to try malformed and
crafted objects we send a Part 10 file's bytes verbatim (pynetdicom's chunked send),
with the command's SOP Class/Instance UIDs taken from its file meta.
"""
from __future__ import annotations

from pathlib import Path

from pynetdicom import AE, _config
from pynetdicom.presentation import build_context

REJECTED = -1     # association refused with an A-ASSOCIATE-RJ
ABORTED = -2      # association aborted or dropped before a response: not a refusal


def rejection(port: int, *, aet: str = "STORESCU", aec: str = "PACSVAULT",
              timeout: float = 30) -> tuple[int, int, int] | str:
    """Ask for an association (Verification only) and report how it ended: the
    A-ASSOCIATE-RJ's (result, source, reason), or "accepted" or "aborted"."""
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    if assoc.is_established:
        assoc.release()
        return "accepted"
    rsp = assoc.acceptor.primitive
    if assoc.is_rejected and rsp is not None:
        return (int(rsp.result), int(rsp.result_source), int(rsp.diagnostic))
    return "aborted"


def send_files(port: int, files: list[Path], *, aet: str = "STORESCU", aec: str = "PACSVAULT",
               contexts: list[tuple[str, str]] | None = None,
               on_ack=None, timeout: float = 60) -> list[int]:  # noqa: ANN001
    """Send each file in one association; returns one status per file.

    ``contexts`` lists (sop_class, transfer_syntax) to propose; by default taken
    from the files' meta. ``on_ack(path, status)`` is called after each response.
    """
    from pydicom.filereader import read_file_meta_info

    metas = [read_file_meta_info(f) for f in files]  # the meta only: the data set may be hostile
    if contexts is None:
        contexts = sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas})
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.requested_contexts = [build_context(c, t) for c, t in contexts][:128]
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=aec)
        if not assoc.is_established:
            return [REJECTED if assoc.is_rejected else ABORTED] * len(files)
        out = []
        for f in files:
            if not assoc.is_established:
                out.append(ABORTED)
                continue
            try:
                rsp = assoc.send_c_store(f)
            except Exception:
                out.append(ABORTED)
                continue
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else ABORTED
            out.append(status)
            if on_ack:
                on_ack(f, status)
        if assoc.is_established:
            assoc.release()
        return out
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
