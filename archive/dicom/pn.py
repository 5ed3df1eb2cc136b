"""Person names folded for case-insensitive matching (PS3.4 C.2.2.2.1).

The catalog keeps each name as received and, beside it, this folded form; a
C-FIND value is folded the same way before it is compared, so "doe^j*" finds
"DOE^JOHN" on SQLite (whose upper() and LIKE only know ASCII) as on PostgreSQL.
Folding: Unicode NFC, then casefold ("ß" becomes "ss", "É" "é"), and trailing
empty components dropped from each component group ("Doe^John^^" is
"Doe^John", PS3.5 6.2.1), so a query need not repeat them. Accents are kept:
"Jérôme" does not match "Jerome".
"""
from __future__ import annotations

import unicodedata

WIDTH = 324  # the catalog column; folding may lengthen a name (ß -> ss)


def fold(name: str | None) -> str:
    if not name:
        return ""
    text = unicodedata.normalize("NFC", name).casefold()
    groups = [g.rstrip(" ^") for g in text.split("=")]
    return "=".join(groups).rstrip("=")[:WIDTH]
