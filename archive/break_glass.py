"""Emergency access ("break glass"): a sealed credential for when every admin is locked
out or unavailable.

``seal`` makes a long random passphrase, prints it once (it goes into an envelope in the
safe) and keeps only its argon2id hash in ``<data_dir>/secrets/break-glass.json``
(0600). ``open_window`` checks the passphrase, requires a reason and opens a window of
at most four hours; the seal is then broken: the same passphrase opens nothing once
the window ends, and a new seal must be made. While the window is open, a command run
with ``PACSVAULT_EMERGENCY`` set to the passphrase acts as the admin ``break-glass``:
every audit record it writes names that actor, so ``audit --user break-glass`` is the
list to review. Opening raises a critical alert (the caller sends it) and is audited
with the reason.
"""
from __future__ import annotations

import json
import os
import secrets
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from archive.clock import Clock, iso, utcnow
from archive.errors import PacsvaultError

ACTOR = "break-glass"
MAX_MINUTES = 240
_hasher = PasswordHasher()


class BreakGlassError(PacsvaultError):
    """emergency access refused: {}"""

    exit_code = 13


def state_path(data_dir: Path) -> Path:
    return data_dir / "secrets" / "break-glass.json"


def _read(data_dir: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(state_path(data_dir).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise BreakGlassError(f"{state_path(data_dir)} is unreadable") from None
    return doc if isinstance(doc, dict) else None


def _write(data_dir: Path, doc: dict[str, Any]) -> None:
    p = state_path(data_dir)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def seal(data_dir: Path, by: str, clock: Clock = utcnow) -> str:
    """A new passphrase (returned once); any earlier seal or window is void."""
    words = secrets.token_urlsafe(30)                       # 240 bits
    phrase = "-".join(words[i:i + 5] for i in range(0, len(words), 5))
    _write(data_dir, {"format": "pacsvault-break-glass", "version": 1,
                      "hash": _hasher.hash(phrase), "sealed_at": iso(clock()), "sealed_by": by,
                      "opened_at": None, "until": None, "reason": None})
    return phrase


def _check(doc: dict[str, Any] | None, phrase: str) -> None:
    if doc is None:
        raise BreakGlassError("no emergency seal on this install ('pacsvault emergency seal')")
    try:
        _hasher.verify(doc["hash"], phrase)
    except (VerifyMismatchError, VerificationError, InvalidHashError, KeyError):
        raise BreakGlassError("the emergency passphrase does not match the seal") from None


def open_window(data_dir: Path, phrase: str, reason: str, minutes: int,
                clock: Clock = utcnow) -> datetime:
    """Break the seal: a window of ``minutes`` (at most four hours) for the reason given."""
    reason = " ".join(reason.split())
    if len(reason) < 10:
        raise BreakGlassError("give the reason (at least 10 characters): it is audited and "
                              "reviewed")
    if not 1 <= minutes <= MAX_MINUTES:
        raise BreakGlassError(f"the window is 1 to {MAX_MINUTES} minutes")
    doc = _read(data_dir)
    _check(doc, phrase)
    assert doc is not None
    if doc.get("opened_at"):
        raise BreakGlassError(f"this seal was already broken at {doc['opened_at']}: an admin "
                              "makes a new one ('pacsvault emergency seal')")
    now = clock()
    until = now + timedelta(minutes=minutes)
    doc.update(opened_at=iso(now), until=iso(until), reason=reason[:500])
    _write(data_dir, doc)
    return until


def close_window(data_dir: Path, clock: Clock = utcnow) -> bool:
    doc = _read(data_dir)
    if doc is None or not doc.get("until"):
        return False
    doc["until"] = iso(min(clock(), datetime.fromisoformat(doc["until"])))
    _write(data_dir, doc)
    return True


def active(data_dir: Path, phrase: str, clock: Clock = utcnow) -> bool:
    """Whether ``phrase`` opens an open window now (raises if it does not match)."""
    doc = _read(data_dir)
    _check(doc, phrase)
    assert doc is not None
    until = doc.get("until")
    return bool(until) and clock() < datetime.fromisoformat(until)


def state(data_dir: Path, clock: Clock = utcnow) -> dict[str, Any]:
    """For status: sealed, open (until when, why) or broken; never the hash."""
    doc = _read(data_dir)
    if doc is None:
        return {"state": "none"}
    out = {k: doc.get(k) for k in ("sealed_at", "sealed_by", "opened_at", "until", "reason")}
    if not doc.get("opened_at"):
        return {"state": "sealed", **out}
    is_open = clock() < datetime.fromisoformat(doc["until"])
    return {"state": "open" if is_open else "broken", **out}
