"""The fence every object key passes on every backend (tiers/layout.py makes them;
this is the second fence, not the first). S3 has no directories, but other tools
and the filesystem backend treat '/' as one, so '..' and empty segments are
refused as they would be on a filesystem."""
from __future__ import annotations

import re

MAX_KEY_BYTES = 900         # S3 allows 1024 bytes, a prefix included
_CONTROL = re.compile("[\x00-\x1f\x7f]")   # one regex scan: this runs on every read


def is_safe_key(key: str) -> bool:
    parts = key.split("/")
    return not (key.startswith("/") or any(p in ("", ".", "..") for p in parts)
                or _CONTROL.search(key) is not None
                or len(key.encode("utf-8")) > MAX_KEY_BYTES)
