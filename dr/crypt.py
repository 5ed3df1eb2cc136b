"""age encryption of volume members (https://age-encryption.org/v1).

Encryption runs in Debian's ``age`` binary when it is installed: pyrage holds
the GIL (two threads encrypt no faster than one), a separate process runs on
the other core while Python compresses and writes. Without the binary, pyrage
encrypts in-process. Both write the same format; any age implementation reads
it. Decryption (restore time only) uses pyrage with the operator's identities.
"""
from __future__ import annotations

import io
import shutil
import subprocess

import pyrage

from dr.keys import parse_recipient

AGE = shutil.which("age")


class DecryptFailed(Exception):
    """Wrong key, or the member was altered (age authenticates every 64 KiB chunk)."""


def encrypt(data: bytes, recipients: list[str], *, use_binary: bool = True) -> bytes:
    if use_binary and AGE:
        args = [AGE, "--encrypt"]
        for r in recipients:
            args += ["-r", r]
        p = subprocess.run(args, input=data, capture_output=True, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"age failed: {p.stderr.decode(errors='replace').strip()[:200]}")
        return p.stdout
    return pyrage.encrypt(data, [parse_recipient(r) for r in recipients])


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
