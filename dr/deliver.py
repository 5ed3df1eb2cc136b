"""Where a restore delivers verified instances: a directory, a PACS, the online sites.

Every delivery receives a scratch file whose bytes already match the catalog
SHA-256, and says whether an instance is already there (so an interrupted
restore resumes without sending twice).
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import update

from archive.catalog.models import Copy
from archive.catalog.uow import Catalog
from archive.clock import utcnow
from archive.dicom.net import client
from archive.errors import InvalidInput
from archive.uids import validate_uid
from tiers.backend import Backend, BackendError, FilePayload, ObjectExists
from tiers.layout import instance_key


class Delivery(Protocol):
    name: str

    def done(self, item: Any) -> bool: ...

    def deliver(self, item: Any, path: Path) -> None: ...

    def close(self) -> None: ...


# Optional abilities of a Delivery: a caller tests them with isinstance.
@runtime_checkable
class Journaled(Protocol):
    """A delivery that journals its run so an interrupted one can be resumed."""

    restarted: bool     # an interrupted run's journal was dropped, not resumed

    def expire(self) -> None:
        """The run delivered everything: nothing is left to resume."""
        ...


@runtime_checkable
class WrappingDelivery(Protocol):
    """A delivery that hands each instance on to another (de-identification)."""

    inner: Delivery


class DeliveryRefused(InvalidInput):
    """{}"""
    # An instance a delivery will not put where it was asked to (the message says why,
    # in one line): the restore reports it as a failure and goes on with the others.


_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DirDelivery:
    """DICOM Part 10 files as acknowledged: DIR/<study>/<series>/<sop>.dcm (a later
    version of a conflicting instance: <sop>.v<N>.dcm), which PACS import tools walk.

    The names come only from UIDs that pass archive/uids.py (a catalog rebuilt from
    media is input too). Below DIR, every directory is opened relative to its
    parent without following a symlink, and files are made with link(2)/O_EXCL
    there, so nothing is ever written outside DIR or through a link. A file already
    at a name is never replaced: the same bytes count as delivered, anything else
    is kept and reported as a conflict."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = f"directory {root}"
        root.mkdir(parents=True, exist_ok=True)
        self.scratch = root / ".pacsvault-restore"
        try:
            self.scratch.mkdir(mode=0o700)
        except FileExistsError:
            pass
        if self.scratch.is_symlink() or not self.scratch.is_dir():
            raise InvalidInput(f"{self.scratch} is a symlink or not a directory: remove it")
        self.written: list[Path] = []

    def names_of(self, item: Any) -> tuple[str, str, str]:
        """(study, series, file name), from validated UIDs only."""
        i = item.inst
        try:
            study = validate_uid(item.study_uid, "Study Instance")
            series = validate_uid(i.series_uid, "Series Instance")
            sop = validate_uid(i.sop_uid, "SOP Instance")
        except InvalidInput as e:
            raise DeliveryRefused(f"not written: {e}") from None
        version = int(i.version)
        return study, series, sop + (f".v{version}" if version != 1 else "") + ".dcm"

    def path_of(self, item: Any) -> Path:
        study, series, name = self.names_of(item)
        return self.root / study / series / name

    def _open_dir(self, names: tuple[str, ...], create: bool) -> int | None:
        """A descriptor of DIR/names..., each level opened in its parent without
        following a symlink; None if a level is missing and not ``create``."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for depth, n in enumerate(names):
                if create:
                    try:
                        os.mkdir(n, 0o750, dir_fd=fd)
                    except FileExistsError:
                        pass
                try:
                    sub = os.open(n, _DIR_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if create:
                        raise
                    os.close(fd)
                    return None
                except OSError:         # ELOOP: a symlink; ENOTDIR: a file
                    where = self.root.joinpath(*names[:depth + 1])
                    raise DeliveryRefused(f"conflict: {where} is a symlink or not a directory; "
                                          "nothing was written through it") from None
                os.close(fd)
                fd = sub
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _holds(dir_fd: int, name: str, item: Any) -> bool | None:
        """Whether DIR/.../name is a regular file with the instance's bytes (None: absent).
        A symlink there is never followed, so it is 'other bytes'."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError:
            return False
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size != item.inst.size:
                return False
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest() == item.inst.sha256

    def done(self, item: Any) -> bool:
        try:
            study, series, name = self.names_of(item)
            fd = self._open_dir((study, series), create=False)
        except DeliveryRefused:
            return False                # deliver() reports why
        if fd is None:
            return False
        try:
            return self._holds(fd, name, item) is True
        finally:
            os.close(fd)

    def deliver(self, item: Any, path: Path) -> None:
        try:
            study, series, name = self.names_of(item)
            fd = self._open_dir((study, series), create=True)
            try:
                try:
                    placed = _place(path, fd, name)
                except FileExistsError:
                    placed = False
                if not placed and not self._holds(fd, name, item):
                    raise DeliveryRefused(
                        f"conflict: {self.root / study / series / name} already holds other "
                        "bytes (or is not a regular file); kept as it is, not replaced")
            finally:
                os.close(fd)
        finally:
            path.unlink(missing_ok=True)        # the scratch name; the bytes stay linked
        if placed:
            self.written.append(self.root / study / series / name)

    def close(self) -> None:
        """Make everything delivered durable before the restore reports success: one
        fsync per file and directory at the end, not one per file as it arrives (a
        file torn by a crash fails its SHA-256 check and is restored again)."""
        for d in {p.parent for p in self.written} | {p.parent.parent for p in self.written}:
            fd = os.open(d, _DIR_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for p in self.written:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.written.clear()
        try:
            self.scratch.rmdir()
        except OSError:
            pass


def _place(src: Path, dir_fd: int, name: str) -> bool:
    """Put ``src``'s bytes at ``name`` in ``dir_fd`` unless something is there
    (FileExistsError; never replaced, never followed): a hard link when the scratch
    file is on the same filesystem, else an O_EXCL copy."""
    try:
        os.link(src, name, dst_dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            raise
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o640, dir_fd=dir_fd)
    with os.fdopen(out, "wb") as dst, open(src, "rb") as f:
        while chunk := f.read(1 << 20):
            dst.write(chunk)
    return True


class OnlineDelivery:
    """Back onto every healthy online site, through their verified write; the
    catalog's copies become 'ok' (a study restored from DR is online again)."""

    def __init__(self, catalog: Catalog, sites: list[Backend]) -> None:
        self.catalog = catalog
        self.sites = [s for s in sites if s.health().ok]
        if not self.sites:
            raise InvalidInput("no healthy online site to restore to")
        self.name = "online sites " + ", ".join(s.name for s in self.sites)

    def done(self, item: Any) -> bool:
        """Every healthy site has a verified copy in the catalog and the file is there
        with its size (after a disaster the catalog may still say ok)."""
        for s in self.sites:
            c = item.inst.copies.get(s.name)
            if c is None or c.state != "ok":
                return False
            try:
                if s.stat(c.key).size != item.inst.size:
                    return False
            except BackendError:
                return False
        return True

    def deliver(self, item: Any, path: Path) -> None:
        inst = item.inst
        payload = FilePayload(path, inst.size, inst.sha256)
        now = utcnow()
        for site in self.sites:
            c = inst.copies.get(site.name)
            key = c.key if c is not None else instance_key(
                item.study_uid, inst.sop_uid, inst.sha256 if inst.version > 1 else None)
            try:
                site.put(key, payload, replace=c is not None and c.state in ("corrupt",))
            except ObjectExists:
                key = instance_key(item.study_uid, inst.sop_uid, inst.sha256)
                site.put(key, payload)
            with self.catalog.unit(write=True) as uow:
                if c is not None:
                    uow.session.execute(update(Copy).where(Copy.id == c.id).values(
                        key=key, state="ok", verified_at=now))
                else:
                    uow.session.add(Copy(instance_fk=inst.id, location=site.name, key=key,
                                         state="ok", verified_at=now))
                uow.commit()
        path.unlink(missing_ok=True)

    def close(self) -> None:
        pass


# Success, and the warnings that still mean stored: coercion of data elements (0xB000),
# elements discarded (0xB006), data set does not match SOP class (0xB007).
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})

AE_TARGET = re.compile(r"^(?P<ae>[ -~]{1,16})@(?P<host>[A-Za-z0-9.:\[\]-]{1,253}):(?P<port>\d{1,5})$")


def parse_ae_target(text: str) -> tuple[str, str, int]:
    m = AE_TARGET.match(text)
    if not m or not m["ae"].strip() or "\\" in m["ae"] or not 0 < int(m["port"]) < 65536:
        raise InvalidInput("--to-ae wants AE_TITLE@HOST:PORT, e.g. ORTHANC@10.0.0.5:4242")
    return m["ae"].strip(), m["host"].strip("[]"), int(m["port"])


class AeDelivery:
    """C-STORE to a PACS with our own SCU (archive/dicom/net/client.py), the data set's
    bytes sent verbatim, streamed from the file, in one association proposing the
    (SOP class, transfer syntax) pairs the restored instances need. A journal of the
    instances this run stored lets an interrupted run be continued with ``resume``
    without sending them twice. It lives only as long as its run: a run that is not
    resumed starts it afresh (``restarted`` says one was dropped), and a complete run
    removes it (``expire``), so a later restore to the same PACS sends everything
    again (the PACS may have lost or deleted what it had)."""

    TIMEOUTS = client.Timeouts(connect_s=60, network_s=60, dimse_s=60)

    def __init__(self, target: str, calling_ae: str, contexts: list[tuple[str, str]],
                 journal: Path, *, resume: bool = False,
                 move_originator: tuple[str, int] | None = None) -> None:
        self.move_originator = move_originator     # a C-MOVE's sub-operations name it
        self.ae_title, self.host, self.port = parse_ae_target(target)
        self.name = f"{self.ae_title}@{self.host}:{self.port}"
        if not contexts:
            raise InvalidInput(f"nothing to send to {self.name}: no instance to restore")
        if len(contexts) > client.MAX_CONTEXTS:
            raise InvalidInput(f"{len(contexts)} SOP class / transfer syntax pairs: more than "
                               "one association can carry (128); restore fewer studies at once")
        try:
            self.assoc = client.associate(self.host, self.port, called_ae=self.ae_title,
                                          calling_ae=calling_ae,
                                          contexts=[(c, [t]) for c, t in contexts],
                                          timeouts=self.TIMEOUTS)
        except client.AssociationRejected as e:
            raise InvalidInput(f"{self.name} refused the association (check its AE title, "
                               f"and that it accepts our calling AE title): {e.why}") from None
        except client.ScuError as e:
            raise InvalidInput(f"{self.name} refused the association: {e}") from None
        # What the PACS took: an instance whose (SOP class, transfer syntax) it refused
        # cannot be sent verbatim, so it is a named failure and the run goes on.
        self.accepted = {(cx.abstract_syntax, cx.transfer_syntax) for cx in self.assoc.accepted}
        if not self.accepted:
            self.assoc.abort()
            raise InvalidInput(f"{self.name} refused the association: it accepted none of the "
                               f"{len(contexts)} SOP class / transfer syntax pairs proposed")
        self.journal = journal
        journal.parent.mkdir(parents=True, exist_ok=True)
        self.restarted = journal.exists() and not resume
        self.sent = set(journal.read_text().split()) if resume and journal.exists() else set()
        self.log = open(journal, "a" if resume else "w")

    def done(self, item: Any) -> bool:
        return f"{item.inst.sop_uid}/{item.inst.version}" in self.sent

    def deliver(self, item: Any, path: Path) -> None:
        pair = (item.inst.sop_class, item.inst.transfer_syntax)
        if pair not in self.accepted:
            raise DeliveryRefused(f"not sent: {self.name} accepted no presentation context for "
                                  f"SOP class {pair[0]} in transfer syntax {pair[1]} (the "
                                  "bytes are sent as stored, never converted)")
        try:
            code = self.assoc.store(pair[0], item.inst.sop_uid, path,
                                    transfer_syntax=pair[1],
                                    move_originator=self.move_originator).status
        except client.ScuError as e:
            raise BackendError("C-STORE", self.name, f"no response (association lost): {e}"
                               ) from None
        finally:
            path.unlink(missing_ok=True)
        if code not in STORED:
            raise BackendError("C-STORE", self.name, f"status 0x{code:04X}")
        key = f"{item.inst.sop_uid}/{item.inst.version}"
        self.log.write(key + "\n")
        self.log.flush()
        self.sent.add(key)

    def close(self) -> None:
        self.log.close()
        if self.assoc.is_established:
            self.assoc.release()

    def expire(self) -> None:
        """The run delivered everything: nothing is left to resume."""
        self.journal.unlink(missing_ok=True)
