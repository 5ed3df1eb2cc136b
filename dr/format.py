"""The names and numbers of the DR volume format, in one place.

They outlive the code (docs/formats/dr-volume.md specifies them): the writer,
the reader, restore and import spell them from here, so none of them can drift
from the others. Byte format only: nothing here touches the catalog.
"""
from __future__ import annotations

# The label's "format" and the version written; readers read every version
# (1: before volumes were signed, read only with --trust-unsigned; 2: before
# volumes carried the whole catalog).
VOLUME_FORMAT = "pacsvault-dr-volume"
VERSION = 3
READ_VERSIONS = (1, 2, 3)
INDEX_FORMAT = "pacsvault-dr-index"
CATALOG_FORMAT = "pacsvault-dr-catalog"
SEGMENT_FORMAT = "pacsvault-dr-segment"
SEGMENT_VERSION = 1

# Members, in the order they are written: the label, the catalog backup (the
# audit key, then a snapshot of the whole catalog), the segments, the index, the
# catalog rows of the volume, the signature.
LABEL = "PACSVAULT-LABEL.json"
CATALOG_BACKUP_DIR = "catalog-backup"
AUDIT_KEY = f"{CATALOG_BACKUP_DIR}/audit-key.json.age"
SEGMENT_DIR = "seg"
INDEX = "INDEX.json.zst.age"
CATALOG = "CATALOG.json.zst.age"
SIGNATURE = "SIGNATURE.json"

# tar: 512-byte blocks; a segment's tar ends on a whole record of tarfile's
# default size (20 blocks), as tarfile writes it.
TAR_BLOCK = 512
SEGMENT_RECORD = 20 * TAR_BLOCK


def segment_stem(barcode: str, member_no: int) -> str:
    """``<barcode>-<NNNNNN>``: unique in a volume set, sorts in writing order."""
    return f"{barcode}-{member_no:06d}"


def segment_member(stem: str) -> str:
    return f"{SEGMENT_DIR}/{stem}.tar.zst.age"


def catalog_backup_member(snapshot_name: str) -> str:
    """``catalog-backup/catalog-<UTC time>.<kind>.zst.age``: the snapshot's own name
    (archive/catalog/snapshot.py), so ``catalog restore`` takes the file as it is."""
    return f"{CATALOG_BACKUP_DIR}/{snapshot_name}.age"


def is_catalog_backup(name: str) -> bool:
    return name.startswith(CATALOG_BACKUP_DIR + "/")


# Volume states (dr_volumes.state). The writer's: a write under way, or one that
# did not finish (its segments count for nothing).
WRITING = "writing"
FAILED = "failed"
# Custody states, in the order a volume usually lives them.
SEALED = "sealed"
IN_LIBRARY = "in-library"
IN_TRANSIT = "in-transit"
OFFSITE = "offsite"
RECALLED = "recalled"
RETURNED = "returned"
EXPIRED = "expired"
DESTROYED = "destroyed"

WRITER_STATES = (WRITING, FAILED)
CUSTODY_STATES = (SEALED, IN_LIBRARY, IN_TRANSIT, OFFSITE, RECALLED, RETURNED, EXPIRED,
                  DESTROYED)
# A volume in one of these holds what it says: its segments count as copies.
GOOD_STATES = (SEALED, IN_LIBRARY, IN_TRANSIT, OFFSITE, RECALLED, RETURNED)
# ... and in one of these it is on site (no recall needed to read it).
ONSITE_STATES = (SEALED, IN_LIBRARY, RECALLED, RETURNED)
# Never sealed, or gone: no retention, no manifest.
UNSEALED_OR_GONE = (WRITING, FAILED, DESTROYED)
