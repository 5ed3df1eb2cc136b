"""The courier's manifest: one printable HTML page listing DR volumes, with Code 39 barcodes.

Self-contained (inline CSS and SVG, no scripts, no external resources) so it
prints the same anywhere. It is built from dr_volumes columns only: never a
study, patient or UID, so the paper that travels with the tapes carries no PHI.
Everything from the catalog is HTML-escaped.
"""
from __future__ import annotations

import os
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from sqlalchemy import select

from archive.catalog.models import DrVolume
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from archive.errors import InvalidInput
from dr.custody import aware, check_barcode, clean_text
from dr.format import UNSEALED_OR_GONE

# Code 39: each character is 9 elements (bar, space, bar, ... bar), 3 of them
# wide. Bit 8 (most significant) is the first bar; a set bit is a wide element.
# The standard table (ISO/IEC 16388), '*' being the start/stop character.
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-. *$/+%"
_PATTERNS = (
    0x034, 0x121, 0x061, 0x160, 0x031, 0x130, 0x070, 0x025, 0x124, 0x064,   # 0-9
    0x109, 0x049, 0x148, 0x019, 0x118, 0x058, 0x00D, 0x10C, 0x04C, 0x01C,   # A-J
    0x103, 0x043, 0x142, 0x013, 0x112, 0x052, 0x007, 0x106, 0x046, 0x016,   # K-T
    0x181, 0x0C1, 0x1C0, 0x091, 0x190, 0x0D0, 0x085, 0x184, 0x0C4, 0x094,   # U-Z - . space *
    0x0A8, 0x0A2, 0x08A, 0x02A,                                             # $ / + %
)
CODE39 = {c: format(p, "09b") for c, p in zip(ALPHABET, _PATTERNS)}
WIDE = 3        # modules in a wide element (narrow = 1); 3:1 scans best on laser prints
QUIET = 10      # blank modules either side, as the symbology asks


def code39_modules(text: str) -> str:
    """'1' (bar) / '0' (space) per module for *text*, start/stop included."""
    bad = sorted({c for c in text if c not in CODE39 or c == "*"})
    if not text or bad:
        raise ValueError("Code 39 encodes 0-9, A-Z and '-. $/+%' only")
    out = []
    for c in f"*{text}*":
        for i, bit in enumerate(CODE39[c]):
            out.append(("1" if i % 2 == 0 else "0") * (WIDE if bit == "1" else 1))
        out.append("0")             # the narrow gap between characters
    return "".join(out)[:-1]        # no gap after the stop character


def code39_svg(text: str, module_mm: float = 0.3, height_mm: float = 13.0) -> str:
    """An inline SVG of *text* as Code 39, bars as rectangles (crisp when printed)."""
    mods = "0" * QUIET + code39_modules(text) + "0" * QUIET
    rects, i = [], 0
    while i < len(mods):
        if mods[i] == "1":
            j = i
            while j < len(mods) and mods[j] == "1":
                j += 1
            rects.append(f'<rect x="{i}" y="0" width="{j - i}" height="40"/>')
            i = j
        else:
            i += 1
    w = len(mods)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="code39" viewBox="0 0 {w} 40" '
            f'width="{w * module_mm:.1f}mm" height="{height_mm:.1f}mm" preserveAspectRatio="none" '
            f'shape-rendering="crispEdges" role="img" aria-label="Code 39 {escape(text)}">'
            f'<rect width="{w}" height="40" fill="#fff"/><g fill="#000">{"".join(rects)}</g></svg>')


def load(catalog: Catalog, barcodes: list[str]) -> list[dict[str, Any]]:
    """The manifest's facts about each volume: dr_volumes columns, nothing else."""
    out = []
    with catalog.unit() as uow:
        for code in dict.fromkeys(barcodes):       # each once, in the order given
            check_barcode(code)
            v = uow.session.scalars(select(DrVolume).where(DrVolume.barcode == code)).first()
            if v is None:
                raise InvalidInput(f"no volume with barcode {code} in the catalog")
            if v.state in UNSEALED_OR_GONE or not v.stream_sha256:
                raise InvalidInput(f"{code} is {v.state}: only sealed volumes go on a manifest")
            out.append({"barcode": v.barcode, "pool": v.pool, "volume_set": v.volume_set,
                        "sequence": v.sequence, "continues": v.continues, "bytes": v.bytes,
                        "studies": v.studies, "sealed_at": aware(v.sealed_at),
                        "sha256": v.stream_sha256, "state": v.state, "location": v.location})
    return out


def _size(n: int) -> str:
    for unit, k in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} bytes"


CSS = """
body { font: 11pt/1.35 "DejaVu Sans", Arial, sans-serif; color: #000; margin: 0 auto;
       max-width: 190mm; padding: 8mm; }
h1 { font-size: 16pt; margin: 0 0 2mm; }
.meta td { padding: 0 6mm 0 0; }
.vol { border: 0.3mm solid #000; margin: 4mm 0; padding: 3mm; break-inside: avoid;
       page-break-inside: avoid; }
.vol table { border-collapse: collapse; width: 100%; }
.vol th { text-align: left; font-weight: normal; color: #333; width: 30mm; vertical-align: top; }
.vol td, .vol th { padding: 0.4mm 2mm 0.4mm 0; }
.code { font: bold 13pt monospace; letter-spacing: 1pt; }
.sha { font: 9pt monospace; word-break: break-all; }
.box { display: inline-block; width: 4mm; height: 4mm; border: 0.3mm solid #000;
       vertical-align: middle; }
.sign { margin-top: 8mm; width: 100%; border-collapse: collapse; break-inside: avoid; }
.sign td { padding: 9mm 4mm 1mm 0; border-bottom: 0.3mm solid #000; width: 33%; }
.sign th { text-align: left; font-weight: normal; font-size: 9pt; padding-top: 1mm; }
.note { font-size: 9pt; color: #333; }
@page { size: A4; margin: 12mm; }
@media print { body { padding: 0; } }
"""


def render(volumes: list[dict[str, Any]], generated_at: datetime, courier_ref: str = "") -> str:
    """The page. Every value from the catalog goes through escape()."""
    def e(x: object) -> str:
        return escape(str(x), quote=True)

    parts = []
    for v in volumes:
        try:
            bars = code39_svg(v["barcode"])
        except ValueError:
            bars = '<p class="note">(this barcode has characters Code 39 cannot print)</p>'
        sealed = v["sealed_at"].strftime("%Y-%m-%d %H:%M UTC") if v["sealed_at"] else "-"
        rows = (
            ("Pool", e(v["pool"])),
            ("Volume set", f'{e(v["volume_set"][:8])} &nbsp; volume #{e(v["sequence"])}'
                           + (" (the set continues on the next volume)" if v["continues"] else "")),
            ("Size", f'{e(_size(v["bytes"]))} ({e(v["bytes"])} bytes)'),
            ("Studies", f'{e(v["studies"])} (encrypted)'),
            ("Sealed", e(sealed)),
            ("SHA-256", f'<span class="sha">{e(v["sha256"])}</span>'),
            ("State", f'{e(v["state"])}{" at " + e(v["location"]) if v["location"] else ""}'),
            ("Received", '<span class="box"></span> &nbsp; intact, seal unbroken'),
        )
        body = "".join(f"<tr><th>{k}</th><td>{val}</td></tr>" for k, val in rows)
        parts.append(f'<section class="vol">{bars}<div class="code">{e(v["barcode"])}</div>'
                     f"<table>{body}</table></section>")
    total = sum(v["bytes"] for v in volumes)
    when = generated_at.strftime("%Y-%m-%d %H:%M UTC")
    courier = f"<tr><td>Courier reference</td><td>{e(courier_ref)}</td></tr>" if courier_ref else ""
    sign = "".join(f"<tr><td></td><td></td><td></td></tr><tr><th>{who} (name, signature)</th>"
                   "<th>Organisation</th><th>Date and time</th></tr>"
                   for who in ("Released by", "Received by"))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>DR volume transfer manifest</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style></head><body>"
        "<h1>DR volume transfer manifest</h1>"
        f'<table class="meta"><tr><td>Date</td><td>{e(when)}</td></tr>{courier}'
        f"<tr><td>Volumes</td><td>{len(volumes)}, {e(_size(total))} in all</td></tr></table>"
        '<p class="note">Every volume is encrypted. This manifest names no patient and no '
        "study. Check each barcode and tick it on receipt; the SHA-256 identifies the "
        "volume's contents when it is read back.</p>"
        f'{"".join(parts)}<table class="sign">{sign}</table></body></html>\n')


def write_manifest(catalog: Catalog, barcodes: list[str], out: Path, courier_ref: str = "",
                   clock: Clock = utcnow) -> dict[str, Any]:
    """Write the manifest to *out* (whole or not at all); return a short report."""
    courier_ref = clean_text("courier_ref", courier_ref)
    vols = load(catalog, barcodes)
    page = render(vols, clock(), courier_ref)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as err:
        raise InvalidInput(f"--out: cannot write there ({err.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"out": str(out), "volumes": [v["barcode"] for v in vols],
            "bytes": sum(v["bytes"] for v in vols)}
