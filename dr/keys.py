"""age keys for DR volumes: the daemon holds public recipients only.

An identity (private key) is made by `pacsvault dr keygen`, written only to the
file it is given (mode 0600, in the format of age-keygen, so Debian's
``age -d -i FILE`` reads it), and handed to pacsvault only to read volumes back.
A recipient's fingerprint (the first 16 hex digits of the SHA-256 of its
``age1...`` text) goes on each volume's plaintext label, so an operator can
tell which key a volume needs without any secret.
"""
from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path

from pyrage import x25519

from archive.errors import InvalidInput


def fingerprint(recipient: str) -> str:
    return hashlib.sha256(recipient.strip().encode()).hexdigest()[:16]


def keygen(out: Path, verify_line: str | None = None) -> str:
    """Write a new identity to ``out`` (refusing to overwrite); return its recipient.
    ``verify_line``: the comment naming the key volumes are signed with (dr/signing.py),
    kept with the identity so whoever reads the volumes can tell ours from forgeries."""
    ident = x25519.Identity.generate()
    public = str(ident.to_public())
    text = (f"# created: {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
            f"# public key: {public}\n" + (f"{verify_line}\n" if verify_line else "")
            + f"{ident}\n")
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidInput(f"{out} exists: an identity is never overwritten") from None
    except OSError as e:
        raise InvalidInput(f"cannot create {out}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return public


def parse_recipient(text: str) -> x25519.Recipient:
    try:
        return x25519.Recipient.from_str(text.strip())
    except Exception:
        raise InvalidInput(f"not an age recipient: {text.strip()[:12]}...") from None


def load_identities(paths: list[Path]) -> list[x25519.Identity]:
    """Identities from age identity files (comments and blank lines skipped).
    Errors never quote the file's content."""
    out = []
    for p in paths:
        try:
            lines = Path(p).read_text().splitlines()
        except OSError as e:
            raise InvalidInput(f"cannot read identity file {p}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise InvalidInput(f"identity file {p} is not text") from None
        found = 0
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                out.append(x25519.Identity.from_str(line))
                found += 1
            except Exception:
                raise InvalidInput(f"identity file {p} holds a line that is not an age "
                                   "X25519 identity (AGE-SECRET-KEY-1...)") from None
        if not found:
            raise InvalidInput(f"identity file {p} holds no identity")
    return out


def identity_fingerprints(idents: list[x25519.Identity]) -> set[str]:
    return {fingerprint(str(i.to_public())) for i in idents}
