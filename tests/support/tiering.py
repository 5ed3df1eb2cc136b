"""An embedded-default install filled in-process, for the object-tier tests.

``Install`` runs the real ``pacsvault init`` and then stores objects through
the same IngestService the daemon uses (no network: the DICOM path has its own
tests), so tiering tests start from exactly the state a push leaves behind.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from archive.app.compose import open_catalog, open_object_tier, open_sites
from archive.app.ingest import IngestService, StoreRequest
from archive.config.load import load_settings
from replication.mirror import MirrorWriter
from tests.support.daemon import init_instance
from tests.support.dataset import Made


@dataclass
class Install:
    config: Path
    stored: list[Made] = field(default_factory=list)

    @classmethod
    def create(cls, root: Path, toml_extra: str = "") -> "Install":
        return cls(init_instance(root, toml_extra=toml_extra))

    @property
    def settings(self):  # noqa: ANN201
        return load_settings(self.config)

    def ingest(self, made: list[Made], calling_ae: str = "STORESCU") -> None:
        s = self.settings
        catalog = open_catalog(s)
        mirror = MirrorWriter(open_sites(s), timeout_s=30, retry_after_s=0)
        svc = IngestService(catalog, mirror)
        try:
            for m in made:
                # The ingest path finds the data set after a Part 10 header too.
                r = svc.store(StoreRequest(m.path, m.sop_class, m.sop_uid, m.transfer_syntax,
                                           calling_ae))
                assert r.acknowledged, r
                self.stored.append(m)
        finally:
            svc.close()
            mirror.close()
            catalog.close()

    def catalog(self):  # noqa: ANN201
        return open_catalog(self.settings)

    def sites(self):  # noqa: ANN201
        return open_sites(self.settings)

    def tier(self):  # noqa: ANN201
        return open_object_tier(self.settings)

    def site_files(self) -> list[Path]:
        out = []
        for s in self.settings.sites:
            out += sorted((s.path / "objects").rglob("*.dcm"))
        return out

    def tier_files(self) -> list[Path]:
        return sorted((self.settings.objects.path / "bundles").rglob("*.pvb"))


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def site_state(inst: Install) -> dict[str, str]:
    """'<site>/<relative path>' -> SHA-256 of every object file on the online sites."""
    out = {}
    for s in inst.settings.sites:
        for p in sorted((s.path / "objects").rglob("*.dcm")):
            out[f"{s.name}/{p.relative_to(s.path)}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
