"""Files holding patient data or secrets are never readable by other users.

init + serve + a storescu push + dr keygen + dr write, run under a permissive
umask (022, and 000), must leave no file readable or writable by others and no
directory open to them: files 0600/0640, directories 0750 at most.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.support.daemon import Daemon, free_port, init_instance, run_cli, storescu
from tests.support.dataset import make_ct_series


def too_open(root: Path) -> list[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode) or re.fullmatch(r"serve-\d+\.log", name):
                continue    # the test harness writes the daemon's log itself
            limit = 0o750 if stat.S_ISDIR(st.st_mode) else 0o640
            if stat.S_IMODE(st.st_mode) & ~limit:
                bad.append(f"{oct(stat.S_IMODE(st.st_mode))} {p.relative_to(root)}")
    return bad


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_everything_created_is_private(tmp_path: Path, umask: int) -> None:
    require_tool("storescu")
    old = os.umask(umask)
    try:
        cfg = init_instance(tmp_path / "pv")
        root = cfg.parent
        run_cli(cfg, "peer", "add", "STORESCU", "127.0.0.1")
        files = make_ct_series(tmp_path / "in", 3, size=20_000)
        d = Daemon(cfg, free_port(), free_port(), workers=1).start()
        try:
            assert storescu(d.dicom_port, [m.path for m in files]).returncode == 0
            assert d.stop() == 0
        finally:
            d.kill9()
        key = root / "dr-identity.txt"
        recipient = run_cli(cfg, "dr", "keygen", "--out", str(key)).stdout.strip()
        text = cfg.read_text().replace("recipients = []", f'recipients = ["{recipient}"]')
        cfg.write_text(text)
        run_cli(cfg, "dr", "write", "--json")
        assert list((root / "dr").rglob("*.tar")), "a DR volume was written"
        assert (root / "catalog" / "catalog.db").is_file()
        assert too_open(root) == []
    finally:
        os.umask(old)
