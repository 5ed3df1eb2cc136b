"""De-identification on export: `pacsvault restore ... --deidentify`.

A Delivery wrapper (dr/deliver.py) that, between the verified scratch file and
the real delivery (a directory or a PACS), applies the DICOM Basic Application
Confidentiality Profile (PS3.15 Annex E) with dicognito, for data leaving the
hospital (research, a second opinion):

* names, IDs, addresses, institutions replaced (dicognito);
* UIDs remapped from one key, so references between instances, series and
  studies stay coherent (dicognito's mapping is a keyed hash of the original);
* dates shifted back 62-730 days, by an offset that depends on the key and the
  patient, so intervals within one patient's history are kept;
* private attributes and the free-text/descriptive attributes the basic
  profile removes and dicognito leaves alone are removed;
* PatientIdentityRemoved YES, DeidentificationMethod and its code sequence.

Pixel data is not altered: instances whose BurnedInAnnotation is not "NO", and
documents/structured reports (whose content is not inspected), are counted for
the operator to review.

The delivered file has new UIDs and a new name, so "already delivered" cannot
be asked of the inner delivery with the original item: a journal (in the
spool, mode 0600) keyed by the original SOP UID records what was delivered and
under which names, and the key when it was random, so an interrupted export
resumed with ``--resume`` keeps the same mapping. A new export (no ``--resume``)
starts a new journal, and a complete one removes it.
"""
from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archive import audit, phi
from archive.checksum import sha256_file
from archive.errors import InvalidInput
from dr.deliver import AeDelivery, Delivery, DirDelivery, OnlineDelivery

METHOD = "pacsvault basic profile (dicognito {})"   # LO: at most 64 characters
CODES = (   # PS3.16 CID 7050, what was actually done
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    # dicognito keeps sex, age, size, weight: say so.
    ("113108", "Retain Patient Characteristics Option"),
)
# Annex E basic profile "X" attributes (free text, descriptions, device serials)
# that dicognito does not touch: free text is where names and MRNs hide.
REMOVE = (
    "StudyDescription", "SeriesDescription", "PerformedProcedureStepDescription",
    "RequestedProcedureDescription", "ImageComments", "PatientComments", "StudyComments",
    "VisitComments", "AdditionalPatientHistory", "AdmittingDiagnosesDescription",
    "ReasonForTheRequestedProcedure", "ReasonForStudy", "RequestAttributesSequence",
    "ProtocolName", "DerivationDescription", "AcquisitionComments", "InterpretationText",
    "TextComments", "DeviceSerialNumber",
)
MIN_KEY = 16


def check_key(key: str | None) -> None:
    """A short key could be found by trying candidates against the new UIDs."""
    if key is not None and len(key) < MIN_KEY:
        raise InvalidInput(f"the de-identification key must be at least {MIN_KEY} characters")


@dataclass(frozen=True)
class _Inst:
    """What DirDelivery/AeDelivery read of an instance, under its new names."""
    series_uid: str
    sop_uid: str
    version: int
    size: int
    sha256: str
    sop_class: str = ""         # unchanged by de-identification
    transfer_syntax: str = ""   # saved in the syntax it was stored in


@dataclass(frozen=True)
class _Renamed:
    study_uid: str
    inst: _Inst


class DeidentifyingDelivery:
    def __init__(self, inner: Delivery, *, journal: Path, key: str | None = None,
                 map_file: Path | None = None, resume: bool = False) -> None:
        if isinstance(inner, OnlineDelivery):
            # De-identified copies must never replace the archive's originals.
            raise InvalidInput("--deidentify exports copies: use --to DIR or --to-ae, never --online")
        check_key(key)
        import dicognito

        self.inner = inner
        self.name = f"{inner.name} (de-identified)"
        self.method = METHOD.format(dicognito.__version__)
        self.map_file = map_file
        # De-identified files are written next to where the inner delivery renames
        # from (same filesystem); the original stays in the restore scratch.
        self.out_dir = inner.scratch if isinstance(inner, DirDelivery) else None
        for stale in (self.out_dir.glob("*.deid.tmp") if self.out_dir else ()):
            stale.unlink(missing_ok=True)     # a run killed while writing one
        self.journal = journal
        self.entries: dict[str, dict[str, Any]] = {}
        # Like AeDelivery's, the journal lives as long as its run: only --resume reads it.
        self.restarted = journal.exists() and not resume
        if self.restarted:
            journal.unlink()
        self.key, self.key_given = self._open_journal(key)
        self._anonymizers: dict[str, Any] = {}
        self.changed = 0
        self.review = {"burned_in_annotation": 0, "document_content": 0}
        self.per_study: dict[str, int] = {}     # original study UID -> instances delivered

    # -- the journal --------------------------------------------------------------------
    def _open_journal(self, given: str | None) -> tuple[str, bool]:
        """Line 1: the key if it was random (needed to resume with the same mapping),
        else a check of the key given; then one JSON line per instance delivered."""
        check = hmac.new((given or "").encode(), b"pacsvault-deid-check", "sha256").hexdigest()
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        if self.journal.exists() and not self.journal.read_text().strip():
            self.journal.unlink()           # killed before its first line: nothing sent yet
        if self.journal.exists():
            head, *lines = self.journal.read_text().splitlines()
            h = json.loads(head)
            for line in lines:
                try:
                    e = json.loads(line)
                except ValueError:          # a line torn by a crash: that instance is redone
                    continue
                self.entries[e["orig"]] = e
            if "key" in h and given is None:
                key = h["key"]
            elif h.get("key_check") == check and given is not None:
                key = given
            else:
                raise InvalidInput("this export was started with a different de-identification "
                                   f"key; resume it with the same key, or remove {self.journal} "
                                   "and export to a new place")
        else:
            key = given or secrets.token_hex(32)
            fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"key_check": check} if given else {"key": key}) + "\n")
        self.log = open(self.journal, "a")
        return key, given is not None

    @staticmethod
    def _renamed(e: dict[str, Any], original: Any = None) -> _Renamed:
        """The instance under its new names; ``original`` gives the SOP class and
        transfer syntax a PACS delivery proposes (the journal does not keep them)."""
        return _Renamed(e["study"][1], _Inst(e["series"][1], e["sop"], e["version"], e["size"],
                                             e["sha256"],
                                             getattr(original, "sop_class", ""),
                                             getattr(original, "transfer_syntax", "")))

    # -- the Delivery protocol ----------------------------------------------------------
    def done(self, item: Any) -> bool:
        e = self.entries.get(f"{item.inst.sop_uid}/{item.inst.version}")
        return e is not None and self.inner.done(self._renamed(e))

    def deliver(self, item: Any, path: Path) -> None:
        from pydicom import dcmread

        out: Path | None = None
        try:
            try:
                ds = dcmread(path)
                patient = str(ds.get("PatientID", ""))
                self._deidentify(ds, patient)
                fd, name = tempfile.mkstemp(dir=self.out_dir or path.parent, suffix=".deid.tmp")
                os.close(fd)
                out = Path(name)
                ds.save_as(out, enforce_file_format=True)   # same transfer syntax as stored
            except Exception as e:      # pydicom's messages may quote values: name the type only
                if out is not None:
                    out.unlink(missing_ok=True)
                raise InvalidInput(f"cannot de-identify instance {phi.token(item.inst.sop_uid)} "
                                   f"({type(e).__name__}); nothing of it was delivered") from e
        finally:
            path.unlink(missing_ok=True)      # the original's bytes leave no copy behind
        inst = item.inst
        e = {"orig": f"{inst.sop_uid}/{inst.version}", "version": inst.version,
             "study": [item.study_uid, str(ds.StudyInstanceUID)],
             "series": [inst.series_uid, str(ds.SeriesInstanceUID)],
             "sop": str(ds.SOPInstanceUID), "size": out.stat().st_size, "sha256": sha256_file(out)}
        try:
            self.inner.deliver(self._renamed(e, inst), out)
        finally:
            out.unlink(missing_ok=True)
        self.log.write(json.dumps(e) + "\n")
        self.log.flush()
        self.entries[e["orig"]] = e
        self.changed += 1
        self.per_study[item.study_uid] = self.per_study.get(item.study_uid, 0) + 1
        if ds.get("BurnedInAnnotation") != "NO" and "PixelData" in ds:
            self.review["burned_in_annotation"] += 1
        if "EncapsulatedDocument" in ds or "ContentSequence" in ds or "TextValue" in ds:
            self.review["document_content"] += 1

    def close(self) -> None:
        self.inner.close()
        self.log.close()
        if self.map_file is not None:
            self._write_map()

    def expire(self) -> None:
        """The export delivered everything: nothing is left to resume."""
        self.journal.unlink(missing_ok=True)
        if isinstance(self.inner, AeDelivery):
            self.inner.expire()

    # -- the work -------------------------------------------------------------------------
    def _anonymizer(self, patient: str) -> Any:
        """One dicognito Anonymizer per patient: the export's key gives every one the
        same UID/name/ID mapping; only the date shift depends on the patient."""
        a = self._anonymizers.get(patient)
        if a is None:
            from dicognito.anonymizer import Anonymizer
            from dicognito.datetimeanonymizer import DateTimeAnonymizer

            a = Anonymizer(seed=self.key)
            n = int.from_bytes(hmac.new(self.key.encode(), f"dates|{patient}".encode(),
                                        "sha256").digest()[:8], "big")
            lo, hi = 62 * 24, 730 * 24                  # dicognito's own range, in hours
            a.add_element_handler(DateTimeAnonymizer(-(lo + n % (hi - lo))))  # runs first
            self._anonymizers[patient] = a
        return a

    def _deidentify(self, ds: Any, patient: str) -> None:
        from pydicom.dataset import Dataset

        self._anonymizer(patient).anonymize(ds)
        ds.remove_private_tags()
        _remove(ds)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = self.method
        codes = []
        for value, meaning in CODES:
            c = Dataset()
            c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, "DCM", meaning
            codes.append(c)
        ds.DeidentificationMethodCodeSequence = codes

    def _write_map(self) -> None:
        """original -> new UIDs of everything this export delivered, for the operator
        only (mode 0600, also when the file was already there)."""
        assert self.map_file is not None
        rows = sorted({(level, *e[level]) for e in self.entries.values()
                       for level in ("study", "series")}
                      | {("sop", e["orig"].split("/")[0], e["sop"]) for e in self.entries.values()})
        fd = os.open(self.map_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("level", "original_uid", "deidentified_uid"))
            w.writerows(rows)

    def summary(self) -> dict[str, Any]:
        return {"changed": self.changed, "method": self.method,
                "key": "given" if self.key_given else "random",
                "needs_review": dict(self.review), "map_file": str(self.map_file or "") or None,
                "journal": str(self.journal)}


def _remove(ds: Any) -> None:
    for kw in REMOVE:
        if kw in ds:
            delattr(ds, kw)
    for elem in ds:
        if elem.VR == "SQ":
            for sub in elem.value:
                _remove(sub)


def journal_path(spool: Path, target: str, study_uids: list[str]) -> Path:
    """One journal per export (its target and studies), like AeDelivery's."""
    key = hashlib.sha1(f"deid|{target}|{sorted(study_uids)}".encode()).hexdigest()
    return spool / "restore" / f"{key}.deid.journal"


def audit_exports(catalog: Any, deid: DeidentifyingDelivery, *, actor: str, target: str,
                  ok: bool) -> None:
    """One "export" record per study that had instances leave in this run (the
    audit trail is where original IDs belong; the report and logs never carry them)."""

    audit.record_studies(
        catalog, "export", actor,
        {uid: {"deidentified": True, "instances": n, "target": target, "method": deid.method,
               "key": "given" if deid.key_given else "random"}
         for uid, n in deid.per_study.items()},
        outcome_of=lambda d: "success" if ok else "failure")
