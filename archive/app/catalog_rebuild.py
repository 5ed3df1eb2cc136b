"""The catalog rebuilt from what is left, merged with the newest catalog backup there.

From DR volumes (``dr rebuild-catalog``) or from the online sites' files
(``catalog rebuild --from sites``).

Every DR volume carries a snapshot of the whole catalog taken when the volume was
opened (audit trail, accounts' hashes, custody log, peers, jobs included) and the
audit trail's key, both encrypted to the DR recipients (docs/formats/dr-volume.md).
After a total loss a new install reads the volumes, puts back the newest snapshot
found on a volume it believes (signed by our key, contents consistent), installs
the audit key written with it, and then imports every volume's own rows on top:
what the backup did not have yet but a volume holds comes back from the volume.

A restored snapshot also says where copies were: on the old sites and the object
tier. Those that are no longer there (new disks, a lost bucket) are marked
'missing' here, counted per place, so that nothing trusts a copy that is gone.
What happened after the snapshot was taken and is on no volume is lost: the
report says when that was.
"""
from __future__ import annotations

import json
import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import select, update

from archive import audit
from archive.app import catalog_backup
from archive.app.ingest import IngestService, Outcome
from archive.catalog.models import Bundle, Copy, Study
from archive.catalog.uow import Catalog
from archive.checksum import sha256_file
from archive.config.schema import Settings
from archive.errors import InvalidInput
from dr import crypt
from dr.format import AUDIT_KEY
from dr.media import distrust
from dr.reader import BackupMember, VolumeRead
from tiers.backend import Backend, BackendError, ObjectNotFound
from tiers.fs import FilesystemBackend

log = logging.getLogger("pacsvault.catalog_rebuild")

KEY_FORMAT = "pacsvault-audit-key"


def is_empty(catalog: Catalog) -> bool:
    """No study at all: a new install, whose few records a backup may replace."""
    with catalog.unit() as uow:
        return uow.session.scalar(select(Study.id).limit(1)) is None


def newest_backup(reads: list[VolumeRead], trust_unsigned: bool
                  ) -> tuple[VolumeRead, BackupMember] | None:
    """The newest whole snapshot on a volume that may be believed (its name sorts
    by the time it was taken). Only a volume signed by our key: a snapshot holds
    accounts and the audit trail, which --trust-unsigned never lets a volume of
    unknown origin replace (its segments' rows are still imported, checked)."""
    best: tuple[VolumeRead, BackupMember] | None = None
    for vol in reads:
        if vol.label is None or vol.unauthentic or distrust(vol, trust_unsigned):
            continue
        for b in vol.catalog_backups:
            if b.name == AUDIT_KEY or b.truncated or b.path is None:
                continue
            if best is None or PurePosixPath(b.name).name > PurePosixPath(best[1].name).name:
                best = (vol, b)
    return best


def taken_at(member_name: str) -> str | None:
    stamp = PurePosixPath(member_name).name.split(".", 1)[0].removeprefix("catalog-")
    try:
        return datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(
            tzinfo=timezone.utc).isoformat()
    except ValueError:
        return None


def put_back(settings: Settings, vol: VolumeRead, member: BackupMember,
             identities: list) -> dict[str, Any]:
    """Replace the (empty) catalog with the snapshot and install the audit key that
    was written with it. The caller holds the instance lock and has closed the catalog."""
    assert member.path is not None
    with tempfile.TemporaryDirectory(dir=settings.data_dir) as tmp:
        named = Path(tmp) / PurePosixPath(member.name).name   # the name says its kind
        named.symlink_to(member.path.resolve())
        kept = catalog_backup.put_back(settings, named, identities)
    key = next((b for b in vol.catalog_backups
                if b.name == AUDIT_KEY and b.path is not None and not b.truncated), None)
    key_kept = install_audit_key(settings.data_dir, key.path, identities) if key else None
    return {"applied": member.name, "volume": vol.barcode, "taken_at": taken_at(member.name),
            "replaced": str(kept) if kept else None, "audit_key": key is not None,
            "audit_key_replaced": str(key_kept) if key_kept else None}


def install_audit_key(data_dir: Path, sealed: Path, identities: list) -> Path | None:
    """The audit key (and its keyed-from mark) as they were when the snapshot was
    taken; this install's own key, if any, is kept beside it (returned)."""
    try:
        doc = json.loads(crypt.decrypt(sealed.read_bytes(), identities))
    except (crypt.DecryptFailed, ValueError):
        raise InvalidInput("the audit key on the volume cannot be read with the identities "
                           "given") from None
    if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT \
            or not isinstance(doc.get("key_file"), str):
        raise InvalidInput("the audit key member of the volume is malformed")
    key_file = audit.key_path(data_dir)
    mark = audit.mark_path(key_file)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    kept = None
    if key_file.exists():
        if key_file.read_text() == doc["key_file"]:
            return None                        # the same install's key: nothing to do
        kept = key_file.with_name(f"{key_file.name}.replaced-{stamp}")
        key_file.rename(kept)
    if mark.exists():
        mark.rename(mark.with_name(f"{mark.name}.replaced-{stamp}"))
    audit.write_new_secret(key_file, doc["key_file"])
    if isinstance(doc.get("chain_file"), str):
        audit.write_new_secret(mark, doc["chain_file"])
    return kept


def mark_absent_copies(catalog: Catalog, sites: list[Backend],
                       tier: Backend | None) -> dict[str, Any]:
    """Copies the restored catalog names as 'ok' on a site or the object tier that
    no longer holds them become 'missing'. Per place: how many; a place that could
    not be asked (the tier down) is left as it was and named."""
    by_name = {s.name: s for s in sites}
    absent: dict[str, int] = {}
    unchecked: dict[str, str] = {}
    gone: list[int] = []
    bundles: dict[int, bool] = {}
    with catalog.unit() as uow:
        keys = dict(uow.session.execute(select(Bundle.id, Bundle.key)).all())
        rows = uow.session.execute(select(Copy.id, Copy.location, Copy.key, Copy.bundle_fk)
                                   .where(Copy.state == "ok")).all()
    for cid, loc, key, bundle_fk in rows:
        place = by_name.get(loc)
        if place is None and tier is not None and loc == tier.name:
            place = tier
        if place is None:
            unchecked.setdefault(loc, "not configured in this install")
            continue
        if loc in unchecked:
            continue
        try:
            if bundle_fk is not None:
                if bundle_fk not in bundles:
                    bundles[bundle_fk] = _present(place, keys.get(bundle_fk, ""))
                present = bundles[bundle_fk]
            else:
                present = _present(place, key)
        except BackendError as e:
            unchecked[loc] = str(e)
            continue
        if not present:
            gone.append(cid)
            absent[loc] = absent.get(loc, 0) + 1
    with catalog.unit(write=True) as uow:
        for i in range(0, len(gone), 500):
            uow.session.execute(update(Copy).where(Copy.id.in_(gone[i:i + 500]))
                                .values(state="missing"))
        uow.commit()
    return {"absent": absent, "unchecked": unchecked}


def _present(place: Backend, key: str) -> bool:
    try:
        place.stat(key)
        return True
    except ObjectNotFound:
        return False


# -- from the sites' files ----------------------------------------------------------------------
def newest_site_backup(sites: list[FilesystemBackend]) -> tuple[FilesystemBackend, Path] | None:
    """The newest catalog backup any site holds whose file matches its manifest."""
    found: list[tuple[str, FilesystemBackend, Path]] = []
    for site in sites:
        try:
            names = [i.key for i in site.list(catalog_backup.PREFIX) if i.key.endswith(".zst")]
        except BackendError:
            continue
        for key in names:
            path = site.local_path(key)
            try:
                manifest = json.loads(site.local_path(key + ".json").read_text())
            except (OSError, ValueError):
                continue
            if manifest.get("sha256") == sha256_file(path):
                found.append((PurePosixPath(key).name, site, path))
    if not found:
        return None
    _, site, path = max(found, key=lambda t: t[0])
    return site, path


def adopt_site_files(catalog: Catalog, sites: list[FilesystemBackend],
                     ingest: IngestService) -> dict[str, Any]:
    """Rows for the files the sites hold that the catalog does not name (received
    after the backup, or every file when there is none): each parsed and checked as
    a received object is, filed under the key it is stored at, with an 'ok' copy on
    every site holding the same bytes. Nothing is written to a site."""
    known: dict[str, set[str]] = {}
    with catalog.unit() as uow:
        for loc, key in uow.session.execute(select(Copy.location, Copy.key)):
            known.setdefault(loc, set()).add(key)
    holders: dict[str, list[FilesystemBackend]] = {}
    for site in sites:
        for info in site.list("objects/"):
            if info.key not in known.get(site.name, ()):
                holders.setdefault(info.key, []).append(site)
    out: dict[str, Any] = {"adopted": 0, "already_cataloged": 0, "sites_differ": 0,
                           "unreadable": []}
    for key in sorted(holders):
        on = holders[key]
        sums = {s.name: sha256_file(s.local_path(key)) for s in on}
        first = on[0]
        same = [s.name for s in on if sums[s.name] == sums[first.name]]
        out["sites_differ"] += len(on) - len(same)       # a scrub tells which is right
        path = first.local_path(key)
        r = ingest.adopt(path, key, same, size=path.stat().st_size, sha256=sums[first.name])
        if r.outcome is Outcome.STORED:
            out["adopted"] += 1
        elif r.outcome is Outcome.DUPLICATE:
            out["already_cataloged"] += 1
        else:
            # Keys are made of UIDs: fine in the operator's report, never in the log.
            out["unreadable"].append({"site": first.name, "key": key, "reason": r.reason})
    if out["unreadable"]:
        log.warning("catalog rebuild: %d files on the sites could not be read as objects",
                    len(out["unreadable"]))
    return out
