"""Signed DR volumes: a reader can tell a volume we wrote from one anybody could make.

The age recipient is public (it is in the config), so anyone can build a volume our
reader decrypts. The writer therefore signs, with an Ed25519 key that only the
writing side holds (``<data_dir>/secrets/dr-signing.key``, PEM, mode 0600; it cannot
decrypt anything), the list of every member it wrote: name, size and SHA-256 of the
bytes on the medium, label first. The list and its signature are the volume's last
member, ``SIGNATURE.json`` (plaintext: no patient data, only hashes of ciphertext),
written after the index, so the writer still streams and never seeks.

The public half travels with the operator's age identity, as a comment line that
``age -d -i`` ignores::

    # pacsvault-dr-verify-key: ed25519:<base64 of the 32-byte public key>

Format: docs/formats/dr-volume.md ("Signature"); why: docs/security.md.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from archive.errors import InvalidInput

KEY_FILE = "dr-signing.key"
VERIFY_PREFIX = "# pacsvault-dr-verify-key:"
FORMAT = "pacsvault-dr-signature"
SIGNED_FORMAT = "pacsvault-dr-signed"
VERSION = 1

Member = tuple[str, int, str]          # name, size, SHA-256 of the bytes on the medium

log = logging.getLogger("pacsvault.dr")


def key_path(data_dir: Path) -> Path:
    """Next to the audit key: a directory of secrets kept outside the catalog."""
    return Path(data_dir) / "secrets" / KEY_FILE


def load_signing_key(path: Path) -> Ed25519PrivateKey | None:
    """The signing key at ``path``, or None when there is none yet."""
    try:
        pem = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InvalidInput(f"cannot read the DR signing key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise InvalidInput(f"{path} is not a PEM Ed25519 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInput(f"{path} is not an Ed25519 key")
    return key


def load_or_create(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """(the signing key, whether it was made now). Made with O_EXCL and mode 0600
    whatever the umask, so two processes never make two keys."""
    key = load_signing_key(path)
    if key is not None:
        return key, False
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return load_or_create(path)[0], False       # another process made it first
    except OSError as e:
        raise InvalidInput(f"cannot create the DR signing key {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    dfd = os.open(Path(path).parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return key, True


def writer_key(data_dir: Path) -> Ed25519PrivateKey:
    """The key ``dr write`` signs with; made on first use by an install that has
    none (one made before volumes were signed), with a warning: identity files made
    before it do not hold its verification key yet."""
    key, made = load_or_create(key_path(data_dir))
    if made:
        log.warning("made a new DR signing key %s: add its verification key to every DR "
                    "identity file ('pacsvault dr verify-key >> IDENTITY_FILE')",
                    key_path(data_dir))
    return key


def public_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode()


def verify_line(key: Ed25519PrivateKey) -> str:
    """The comment line that goes into an age identity file."""
    return f"{VERIFY_PREFIX} {public_text(key.public_key())}"


def parse_public(text: str) -> Ed25519PublicKey:
    kind, _, b64 = text.strip().partition(":")
    try:
        raw = base64.b64decode(b64, validate=True)
        if kind != "ed25519" or len(raw) != 32:
            raise ValueError
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error):
        raise InvalidInput("not a pacsvault DR verification key (ed25519:<base64>)") from None


def load_verify_keys(paths: list[Path]) -> list[Ed25519PublicKey]:
    """The verification keys on '# pacsvault-dr-verify-key:' lines of identity files."""
    out = []
    for p in paths:
        try:
            lines = Path(p).read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            continue                    # keys.load_identities reports an unreadable file
        for line in lines:
            if line.startswith(VERIFY_PREFIX):
                try:
                    out.append(parse_public(line[len(VERIFY_PREFIX):]))
                except InvalidInput:
                    raise InvalidInput(f"identity file {p}: its '{VERIFY_PREFIX}' line is not "
                                       "an ed25519:<base64> key") from None
    return out


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(key: Ed25519PrivateKey, head: dict[str, Any], members: list[Member]) -> bytes:
    """The SIGNATURE.json member: ``signed`` is the exact text the signature covers."""
    signed = _canonical({"format": SIGNED_FORMAT, "version": VERSION, **head,
                         "members": [list(m) for m in members]}).decode()
    doc = {"format": FORMAT, "version": VERSION, "algorithm": "ed25519",
           "key": public_text(key.public_key()), "signed": signed,
           "signature": base64.b64encode(key.sign(signed.encode())).decode()}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def check(data: bytes | None, read: list[Member], keys: list[Ed25519PublicKey],
          label: dict[str, Any] | None) -> str | None:
    """None when ``data`` (the SIGNATURE.json member) is a valid signature, by one of
    ``keys``, over exactly the members ``read`` before it; else why not, in one line."""
    if data is None:
        return ("it is not signed (written before volumes were signed, cut short before "
                "its end, or forged)")
    try:
        doc = json.loads(data)
        signed_text = doc["signed"]
        sig = base64.b64decode(doc["signature"], validate=True)
        signer = parse_public(doc["key"])
        signed = json.loads(signed_text)
        members = [tuple(m) for m in signed["members"]]
    except (ValueError, KeyError, TypeError, binascii.Error, InvalidInput):
        return "its signature member is unreadable"
    if doc.get("format") != FORMAT or doc.get("algorithm") != "ed25519" \
            or signed.get("format") != SIGNED_FORMAT:
        return "its signature member is not a pacsvault Ed25519 signature"
    if not keys:
        return ("its signature cannot be checked: no identity file given holds a "
                f"'{VERIFY_PREFIX}' line (add it: pacsvault dr verify-key >> IDENTITY_FILE)")
    if not any(k.public_bytes_raw() == signer.public_bytes_raw() for k in keys):
        return (f"it is signed by another key ({public_text(signer)[:20]}...), not by one "
                "in the identity files given")
    try:
        signer.verify(sig, signed_text.encode())
    except InvalidSignature:
        return "its signature does not verify (the volume or its signature was altered)"
    if label is not None and (signed.get("barcode") != label.get("barcode")
                              or signed.get("volume_set") != label.get("volume_set")):
        return "its signature is for another volume"
    if len(members) != len(read):
        return (f"it holds {len(read)} members but its signature covers {len(members)} "
                "(members added, lost or cut short)")
    for want, got in zip(members, read):
        if tuple(want) != tuple(got):
            return f"member {got[0]} differs from what was signed"
    return None
