"""age encryption of volume members (https://age-encryption.org/v1).

Encryption runs in Debian's ``age`` binary when it is installed: pyrage holds
the GIL (two threads encrypt no faster than one), a separate process runs on
the other core while Python compresses and writes. Without the binary, pyrage
encrypts in-process. Both write the same format; any age implementation reads
it. Decryption (restore time only) uses pyrage with the operator's identities.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import shutil
import subprocess
import threading

import pyrage

from dr.keys import parse_recipient

AGE = shutil.which("age")
PIPE_BYTES = 1 << 20     # pipes to and from age: fewer, larger copies and wake-ups than 64 KiB


class DecryptFailed(Exception):
    """Wrong key, or the member was altered (age authenticates every 64 KiB chunk)."""


class Encryptor:
    """One age file, written as it is made: ``write`` plaintext in pieces, then
    ``finish()`` for the ciphertext and its SHA-256.

    With the binary, a thread drains age's stdout (hashing it as it comes) while
    the caller feeds its stdin, so both pipes flow at once and nothing is copied
    through Python's communicate() loop (4 KiB at a time, holding the GIL). The
    ciphertext is read into ``out`` when given (a buffer the caller reuses: no
    fresh pages to fault in, and one contiguous piece), then into new chunks if
    it is longer."""

    def __init__(self, recipients: list[str], *, use_binary: bool = True,
                 out: bytearray | None = None) -> None:
        self.out = memoryview(out if out is not None else bytearray())
        self.n = 0                    # bytes of ``out`` filled
        self.more: list[bytes] = []   # what did not fit in ``out``
        self.h = hashlib.sha256()
        self.failed: BaseException | None = None
        self.p: subprocess.Popen | None = None
        if not (use_binary and AGE):
            self.plain: list[bytes] = []
            self.recipients = [parse_recipient(r) for r in recipients]
            return
        args = [AGE, "--encrypt"]
        for r in recipients:
            args += ["-r", r]
        # close_fds (the default) matters: an age must not hold another one's stdin open.
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, bufsize=0)
        for f in (self.p.stdin, self.p.stdout):
            try:
                fcntl.fcntl(f.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass    # over /proc/sys/fs/pipe-max-size: the default size works too
        self.drain = threading.Thread(target=self._drain, name="dr-age-out", daemon=True)
        self.drain.start()

    def _drain(self) -> None:
        src = self.p.stdout  # type: ignore[union-attr]
        try:
            while self.n < len(self.out):
                got = src.readinto(self.out[self.n:])
                if not got:
                    return
                self.h.update(self.out[self.n:self.n + got])
                self.n += got
            while chunk := src.read(PIPE_BYTES):
                self.h.update(chunk)
                self.more.append(chunk)
        except BaseException as e:
            # Never leave age blocked on a full pipe (and the writer on age's stdin):
            # closing our end stops it; finish() raises this.
            self.failed = e
            src.close()

    def write(self, data: bytes | memoryview) -> None:
        if self.p is None:
            self.plain.append(bytes(data))
            return
        with memoryview(data) as view:
            try:
                while view:
                    view = view[self.p.stdin.write(view):]  # type: ignore[union-attr]
            except BrokenPipeError:
                pass    # age stopped: finish() reports why

    def finish(self) -> tuple[list[bytes | memoryview], int, str]:
        """(the ciphertext as a list of buffers, its length, its SHA-256)."""
        if self.p is None:
            ct = pyrage.encrypt(b"".join(self.plain), self.recipients)
            self.h.update(ct)
            return [ct], len(ct), self.h.hexdigest()
        try:
            self.p.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
        self.drain.join()
        err = self.p.stderr.read()  # type: ignore[union-attr]
        self.p.stderr.close()  # type: ignore[union-attr]
        self.p.stdout.close()  # type: ignore[union-attr]
        if self.failed is not None:
            self.p.wait()
            raise RuntimeError(f"reading age's output failed: {self.failed!r}") from self.failed
        if self.p.wait() != 0:
            raise RuntimeError(f"age failed: {err.decode(errors='replace').strip()[:200]}")
        chunks = [self.out[:self.n], *self.more] if self.n else self.more
        return chunks, self.n + sum(map(len, self.more)), self.h.hexdigest()

    def abort(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def encrypt(data: bytes, recipients: list[str], *, use_binary: bool = True) -> bytes:
    e = Encryptor(recipients, use_binary=use_binary)
    try:
        e.write(data)
        chunks, _, _ = e.finish()
    finally:
        e.abort()
    return b"".join(chunks)


def encrypt_file(src: str, dst: str, recipients: list[str]) -> None:
    """A whole file encrypted into another, streamed (a catalog snapshot can be GBs)."""
    pyrage.encrypt_file(src, dst, [parse_recipient(r) for r in recipients])


def decrypt(data: bytes, identities: list) -> bytes:
    try:
        return pyrage.decrypt(data, identities)
    except Exception as e:
        raise DecryptFailed(str(e) or type(e).__name__) from None


def decrypt_prefix(data: bytes, identities: list) -> bytes:
    """As much plaintext as authenticates from the start of a damaged or
    truncated member (age's STREAM chunks are checked one by one)."""
    out = io.BytesIO()
    try:
        pyrage.decrypt_io(io.BytesIO(data), out, identities)
    except Exception:
        pass
    return out.getvalue()
