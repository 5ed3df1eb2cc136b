"""Copy one instance, verified: the functions every path that moves an object's
bytes uses (repair, scrub repair, restore, DR write), so "a copy that does not
match the catalog is never passed on" is written once: ``copy_verified`` from a
whole stored object, ``frame_verified`` from a frame of a study bundle.

The bytes go to a scratch file while being hashed; the file is handed on only if
its size and SHA-256 match what the catalog says. Memory stays bounded (one 1 MiB
chunk) whatever the object's size.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from tiers.backend import FilePayload
from tiers.bundle import extract_to

CHUNK = 1 << 20


def copy_verified(open_source: Callable[[], BinaryIO], sha256: str, scratch: Path, *,
                  size: int | None = None, suffix: str = ".tmp") -> FilePayload | None:
    """The source's bytes in a new file under ``scratch`` if they hash to ``sha256``
    (and are ``size`` bytes long, when given); None when they do not, and no file
    is left behind. Errors opening or reading the source propagate, after the
    scratch file is removed."""
    scratch.mkdir(parents=True, exist_ok=True)   # only when there is work: idle passes write nothing
    fd, name = tempfile.mkstemp(dir=scratch, suffix=suffix)
    path = Path(name)
    h = hashlib.sha256()
    n = 0
    try:
        with os.fdopen(fd, "wb") as out, open_source() as src:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if h.hexdigest() != sha256 or (size is not None and n != size):
        path.unlink(missing_ok=True)
        return None
    return FilePayload(path, n, sha256)


def frame_verified(open_frame: Callable[[], BinaryIO], length: int, size: int, sha256: str,
                   scratch: Path, *, suffix: str = ".tmp") -> FilePayload:
    """One instance out of its study bundle's frame (``length`` compressed bytes, read
    with ``open_frame``), decompressed into a new file under ``scratch`` and checked
    against ``size`` and ``sha256`` on the way (tiers/bundle.py ``extract_to``).
    Raises BundleError when the frame does not give those bytes, and whatever reading
    raises; the scratch file is removed either way."""
    scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=scratch, suffix=suffix)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, open_frame() as src:
            extract_to(src, length, {"size": size, "sha256": sha256}, out)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return FilePayload(path, size, sha256)
