"""The DR benchmark runs end to end on a small study (CI's short version): both
contenders measured over the same files on both sinks, the ratios computed, the
writer's memory bounded by its segments rather than the study, and the volume
it wrote read back and verified. And the segment tar dr/segment.py streams is byte
for byte what Python's tarfile writes (the format's reference)."""
from __future__ import annotations

import hashlib
import io
import json
import math
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from unittest import mock

import pytest

from dr import segment

pytestmark = [pytest.mark.bench]
REPO = Path(__file__).resolve().parents[2]


def test_quick_dr_bench_compares_with_the_shell_pipeline_and_lto9(tmp_path: Path):
    out = tmp_path / "dr.json"
    # 2 MiB segments: the 60 MB study spans ~30 of them, so a writer that kept the
    # study in memory would show in its peak RSS.
    p = subprocess.run([sys.executable, "-m", "bench.dr", "--quick", "--segment-mb", "2",
                        "--workdir", str(tmp_path), "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(out.read_text())
    assert report["files"] == 114 and report["bytes"] > 59_000_000
    med = report["median_MBps"]
    assert set(med) == {"pipeline null", "dr write null", "pipeline file", "dr write file"}
    assert all(v > 0 for v in med.values())
    assert report["lto9_MBps"] == 400
    ratios = report["ratios"]
    assert set(ratios) == {f"{r}_{s}" for s in ("null", "file")
                           for r in ("dr_vs_pipeline", "dr_vs_lto9", "pipeline_vs_lto9")}
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert ratios["dr_vs_lto9_null"] == round(med["dr write null"] / 400, 2)

    # Memory: what the writer added while writing is bounded by its segments
    # (a few of 2 MiB each, plus zstd and Python), well under the 60 MB study.
    for rnd in report["rounds"]:
        for name in ("dr write null", "dr write file"):
            run = rnd[name]
            assert run["segment_bytes"] == 2 * 1024 * 1024
            assert run["peak_rss_mb"] - run["rss_before_mb"] < 40, run

    # The file volume verifies: every segment decrypts, every file matches its
    # manifest and the catalog, the stream hash is the one recorded when sealed.
    v = report["verify"]
    assert v["ok"] and v["complete"] and v["sha256_as_recorded"], v
    assert v["files_verified"] == 114 and v["segments_ok"] == v["segments"] >= 25
    # dr write and the pipeline made streams of about the same size (same zstd level).
    first = report["rounds"][0]
    ours, theirs = first["dr write file"]["stream_bytes"], first["pipeline file"]["stream_bytes"]
    assert 0.9 < ours / theirs < 1.1, (ours, theirs)


def _tarfile_segment(stem, head, pieces):
    """A segment written by tarfile, as dr/segment.py built it before it streamed:
    (tar bytes, manifest, where the instance files start)."""
    files, sums, joined = [], [], []
    for p in pieces:
        digest = hashlib.sha256(p.data).hexdigest()
        files.append({**p.entry, "path": p.path, "file": p.file, "part": p.part,
                      "parts": p.parts, "part_size": len(p.data), "part_sha256": digest})
        sums.append(f"{digest}  {p.file}\n")
        if p.parts > 1 and p.part == p.parts - 1:
            joined.append(f"{p.entry['sha256']}  {p.path}\n")
    manifest = {"format": "pacsvault-dr-segment", "version": 1, "stem": stem, **head,
                "files": files}
    now = int(time.time())
    buf = io.BytesIO()

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), now, 0o640
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, f"pacsvault/{stem}.manifest.json",
            json.dumps(manifest, sort_keys=True, ensure_ascii=False).encode())
        add(tar, f"pacsvault/{stem}.sha256", "".join(sums).encode())
        if joined:
            add(tar, f"pacsvault/{stem}.joined-sha256", "".join(joined).encode())
        files_at = buf.tell()
        for p in pieces:
            add(tar, p.file, p.data)
    return buf.getvalue(), manifest, files_at


def test_streamed_segment_is_byte_for_byte_segment_build():
    rng = random.Random(5)
    study = "1.2.826.0.1.3680043.8.498." + "1" * 37
    for trial in range(30):
        pieces = []
        for i in range(rng.randrange(1, 7)):
            size = rng.choice([0, 1, 511, 512, 513, 10240, rng.randrange(1, 70_000)])
            data = rng.randbytes(size)
            parts = rng.choice([1, 1, 3])
            entry = {"sop_uid": f"1.2.{trial}.{i}", "version": rng.choice([1, 2]),
                     "series_uid": "1.2.3." + "9" * 58, "sop_class": "1.2.840.10008.5.1.4.1.1.2",
                     "transfer_syntax": "1.2.840.10008.1.2.1", "size": len(data) * parts,
                     "sha256": hashlib.sha256(data).hexdigest(),
                     "received_at": "2026-01-01T00:00:00",
                     "calling_ae": "MODALITÉ", "conflict": False}
            pieces.append(segment.Piece(i, entry, segment.instance_path(study, entry), data,
                                        rng.randrange(parts), parts))
        head = {"volume_set": "v", "barcode": "PV000001",
                "member": "seg/PV000001-000001.tar.zst.age",
                "study_uid": study, "study_segment": 1, "last_of_study": True,
                "study_instances": len(pieces), "study": {"patient": {"name": "Ünïcode^Name"}}}
        digests = [hashlib.sha256(p.data).hexdigest() for p in pieces]
        with mock.patch("time.time", return_value=1_790_000_000.4):
            plain, manifest, files_at = _tarfile_segment("PV000001-000001", head, pieces)
            front, rest, streamed = segment.tar_pieces("PV000001-000001", head, pieces, digests)
            built = segment.build("PV000001-000001", head, pieces)
        assert streamed == manifest
        assert len(front) == files_at
        assert front + b"".join(bytes(b) for b in rest) == plain, trial
        assert built == (plain, manifest, files_at), trial
