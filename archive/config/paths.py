"""Refuse a config whose storage places overlap.

The spool is swept at start-up and a site's tmp/ is swept too; a spool that is a
site (or the install directory) would put the archive one sweep away from
deletion. So the spool, each site, the object tier directory, the SQLite catalog
file, the DR volume directory and the config file itself must each be apart:
none equal to another, none inside another. Paths are compared after resolving
symlinks, and existing directories also by device and inode (a bind mount).
"""
from __future__ import annotations

import os
from pathlib import Path

from archive.config.schema import Settings
from archive.errors import ConfigError


def sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite:/// URL (None for other databases or :memory:)."""
    if not url.startswith("sqlite:///"):
        return None
    rest = url[len("sqlite:///"):].split("?", 1)[0]   # load.resolve made it absolute
    if not rest or rest == ":memory:":
        return None
    return Path(rest)


def _places(settings: Settings) -> list[tuple[str, Path, bool]]:
    """(dotted key, resolved path, is a directory) for every storage place."""
    places: list[tuple[str, Path, bool]] = [("ingest.spool_dir", settings.ingest.spool_dir, True)]
    places += [(f"sites.{i}.path", s.path, True) for i, s in enumerate(settings.sites)]
    if settings.objects.kind == "directory":
        places.append(("objects.path", settings.objects.path, True))
    db = sqlite_file(settings.catalog.url)
    if db is not None:
        places.append(("catalog.url", db, False))
    device = settings.dr.device
    if settings.dr.kind == "ltfs":
        places.append(("dr.device", Path(device), True))
    elif "{barcode}" in device:     # one file per volume: the directory holding them
        places.append(("dr.device", Path(device.split("{barcode}")[0] + "x").parent, True))
    if settings.config_path is not None:
        places.append(("the config file", settings.config_path, False))
    return [(k, Path(os.path.abspath(p)).resolve(), is_dir) for k, p, is_dir in places]


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _blame(outer: str, inner: str) -> str:
    """The key to name first: the spool (the place that is swept), else the inner
    place, but never the config file (which is not a setting)."""
    if "ingest.spool_dir" in (outer, inner):
        return "ingest.spool_dir"
    return outer if inner == "the config file" else inner


_APART = ("the spool, each site, the object tier, the catalog and the DR volumes each need "
          "a directory of their own")


def check_layout(settings: Settings) -> None:
    """Raise ConfigError naming the keys of the first two places that overlap."""
    places = _places(settings)
    for i, (key_a, a, dir_a) in enumerate(places):
        for key_b, b, dir_b in places[i + 1:]:
            if _same(a, b):
                raise ConfigError(f"{_blame(key_a, key_b)}: {key_b} ({b}) is the same place "
                                  f"as {key_a}; {_APART}")
            for outer_key, outer, outer_dir, inner_key, inner in (
                    (key_a, a, dir_a, key_b, b), (key_b, b, dir_b, key_a, a)):
                if outer_dir and inner.is_relative_to(outer):
                    raise ConfigError(f"{_blame(outer_key, inner_key)}: {inner_key} ({inner}) "
                                      f"lies inside {outer_key} ({outer}); {_APART}")


def site_risks(settings: Settings) -> list[str]:
    """Sites sharing one filesystem: legal (tests, a first look) but both copies then
    die with one disk or one building, so status shows it and serve logs it."""
    by_device: dict[int, list[str]] = {}
    for s in settings.sites:
        try:
            by_device.setdefault(os.stat(s.path).st_dev, []).append(s.name)
        except OSError:
            continue        # a site that is away is reported by its health instead
    return [f"{' and '.join(names)} are on the same filesystem (device "
            f"{os.major(dev)}:{os.minor(dev)}): one disk or one building lost loses every copy; "
            "put each site on its own storage in its own building"
            for dev, names in by_device.items() if len(names) > 1]
