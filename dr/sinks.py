"""Where a volume goes: a sequential stream (tape, FIFO, pipe, file) or an LTFS directory.

Both take the same members in the same order and count the bytes a member
costs on the medium, so the writer's end-of-medium arithmetic is the same.

* ``StreamVolume``: one pax tar stream in fixed-size records (dr/tarstream.py),
  opened write-only and never seeked: a FIFO or a tape works as well as a file.
* ``LtfsVolume``: the directory ``<mount>/<barcode>/`` (the LTFS Library
  Edition layout: one directory per cartridge), each member a file, written,
  fsync'd and closed in order. Its volume hash is the SHA-256 of the member
  files' bytes concatenated in order.
"""
from __future__ import annotations

import hashlib
import os
import stat
import sys
from pathlib import Path
from typing import BinaryIO, Protocol, Sequence

from archive.errors import InvalidInput
from dr.tarstream import Data, RecordWriter, pieces


class Volume(Protocol):
    used: int

    def member(self, name: str, data: Data | Sequence[Data]) -> int: ...

    def cost(self, name: str, size: int) -> int: ...

    def finish(self) -> tuple[int, str]: ...

    def abort(self) -> None: ...


class StreamVolume:
    def __init__(self, f: BinaryIO, block_size: int, *, where: str, own: bool = True) -> None:
        self.f, self.own, self.where = f, own, where
        self.rw = RecordWriter(f, block_size)

    @property
    def used(self) -> int:
        return self.rw.n

    def member(self, name: str, data: Data | Sequence[Data]) -> int:
        return self.rw.member(name, data)

    def cost(self, name: str, size: int) -> int:
        return self.rw.member_size(name, size)

    def finish(self) -> tuple[int, str]:
        self.rw.close_archive()
        self.f.flush()
        try:
            if stat.S_ISREG(os.fstat(self.f.fileno()).st_mode):
                os.fsync(self.f.fileno())
        except (OSError, ValueError):
            pass
        if self.own:
            self.f.close()
        return self.rw.n, self.rw.sha256

    def abort(self) -> None:
        if self.own:
            try:
                self.f.close()
            except OSError:
                pass


class LtfsVolume:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.used = 0
        self.h = hashlib.sha256()

    def member(self, name: str, data: Data | Sequence[Data]) -> int:
        at = self.used
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            for chunk in pieces(data):
                self.h.update(chunk)
                self.used += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return at

    def cost(self, name: str, size: int) -> int:
        return size

    def finish(self) -> tuple[int, str]:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.used, self.h.hexdigest()

    def abort(self) -> None:
        pass


def one_volume_per_run(kind: str, device: str) -> bool:
    """A tape drive, FIFO or stdout holds one volume at a time: the next one needs
    an operator (or a changer). A '{barcode}' path or an LTFS mount takes any number."""
    return kind == "stream" and "{barcode}" not in device


def open_volume(kind: str, device: str, barcode: str, block_size: int) -> tuple[Volume, str]:
    """The volume for ``barcode`` and where it is (recorded in the catalog)."""
    if kind == "ltfs":
        root = Path(device) / barcode
        if not Path(device).is_dir():
            raise InvalidInput(f"LTFS mount {device} is not a directory (not mounted?)")
        try:
            root.mkdir()
        except FileExistsError:
            raise InvalidInput(f"{root} exists: a volume is never overwritten") from None
        return LtfsVolume(root), str(root)
    if device == "-":
        return StreamVolume(sys.stdout.buffer, block_size, where="-", own=False), "-"
    path = Path(device.replace("{barcode}", barcode))
    if "{barcode}" in device:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            raise InvalidInput(f"{path} exists: a volume is never overwritten")
    try:
        # Write-only, no O_TRUNC games and no seek: a FIFO, a tape or a file alike.
        f = open(path, "wb", buffering=0)
    except OSError as e:
        raise InvalidInput(f"cannot open DR device {path}: {e.strerror}") from None
    return StreamVolume(f, block_size, where=str(path)), str(path)
