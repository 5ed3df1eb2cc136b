"""The spool: where received objects and scratch copies live before they are stored.

A crash can leave patient data in it, so it is swept at start-up. A sweep is
the one place where pacsvault deletes files it did not just write, so two fences
stand in front of it: the directory must carry our marker (written by init and
serve into a directory that is new, empty, or already looks like our spool), and
only files whose names follow our own temp-file naming are removed (and a
restore drill's scratch area, named by us, in spool/drill/); never a symlink's
target, never anything else.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from archive.errors import ConfigError

MARKER = "PACSVAULT-SPOOL.json"
# Prefix of the files pynetdicom spools received data sets into (see archive/daemon/dicom_scp.py).
RECEIVE_PREFIX = "pv-spool-"
# Our temp files: pynetdicom's received data sets, and tempfile.mkstemp files with a
# suffix of ours (".tmp", ".scrub.tmp", ".recall.tmp", ".restore.tmp", ...).
_TEMP_NAME = re.compile(rf"^(?:{re.escape(RECEIVE_PREFIX)}[a-z0-9_]{{8}}\.dcm"
                        r"|tmp[a-z0-9_]{8}(?:\.[a-z]+)?\.tmp)$")
# Subdirectories we create in the spool: per-worker receive spools and scratch areas.
_OUR_SUBDIRS = re.compile(r"^(?:w\d+|http|repair|scrub|recall|restore|drill|migrate|"
                          r"catalog-backup)$")
# A restore drill's scratch area in spool/drill (dr/drill.py): restored copies of
# patient data that a crash mid-drill would leave behind.
_DRILL_AREA = re.compile(r"^drill-[a-z]+-\d+$")


def is_temp_name(name: str) -> bool:
    return bool(_TEMP_NAME.match(name))


def ensure(spool: Path) -> None:
    """Create the spool (0750) and its marker. A directory that holds anything but
    our own subdirectories and has no marker is someone else's: refuse it."""
    spool.mkdir(mode=0o750, parents=True, exist_ok=True)
    marker = spool / MARKER
    if marker.is_file() and not marker.is_symlink():
        return
    foreign = sorted(e.name for e in os.scandir(spool)
                     if not (e.is_dir(follow_symlinks=False) and _OUR_SUBDIRS.match(e.name)))
    if foreign:
        raise ConfigError(f"ingest.spool_dir: {spool} is not empty and is not a pacsvault spool "
                          f"(no {MARKER}; it holds {len(foreign)} other entries): point "
                          "ingest.spool_dir at a directory of its own")
    tmp = spool / (MARKER + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"format": "pacsvault-spool", "version": 1}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, marker)


def is_ours(spool: Path) -> bool:
    marker = spool / MARKER
    return marker.is_file() and not marker.is_symlink() and not spool.is_symlink()


def sweep(spool: Path, subdir: str | None = None) -> int:
    """Remove our temp files left by a crash: in ``spool/subdir`` only, or in the
    spool and each of our subdirectories. Nothing happens unless the spool carries
    our marker. Returns how many files were removed."""
    if not is_ours(spool):
        return 0
    if subdir is not None:
        dirs = [spool / subdir]
    else:
        dirs = [spool] + [Path(e.path) for e in os.scandir(spool)
                          if e.is_dir(follow_symlinks=False) and _OUR_SUBDIRS.match(e.name)
                          and e.name != "migrate"]   # tiers/migrate.py sweeps its own
    removed = 0
    for d in dirs:
        if d.is_symlink() or not d.is_dir():
            continue
        for entry in os.scandir(d):
            if entry.is_file(follow_symlinks=False) and is_temp_name(entry.name):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
            elif d.name == "drill" and d.parent == spool and _DRILL_AREA.match(entry.name) \
                    and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)   # never follows symlinks
                removed += 1
    return removed
