"""Keeping patient data out of logs.

Logs name objects by a short token: the first 12 hex digits of the SHA-256 of
the identifier. An operator correlates a log line with the catalog by computing
the same token (``pacsvault`` prints it next to UIDs it shows), while a log file
alone does not reveal identifiers.
"""
from __future__ import annotations

import hashlib


def token(value: str | None) -> str:
    if not value:
        return "-"
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:12]
