"""Shared fixtures. Under CI=true a missing external tool fails the test: a silent
skip is how fault tests stop running without anyone noticing."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support import pg
from tests.support.daemon import Daemon, free_port, init_instance
from tests.support.needs import missing


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("PACSVAULT_"):
            monkeypatch.delenv(k)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} not installed")
    return path


@pytest.fixture
def instance(tmp_path: Path) -> Path:
    """A fresh embedded-default install allowing STORESCU from 127.0.0.1."""
    cfg = init_instance(tmp_path / "pv")
    from tests.support.daemon import run_cli

    run_cli(cfg, "peer", "add", "STORESCU", "127.0.0.1")
    return cfg


@pytest.fixture
def daemon(instance: Path):
    require_tool("storescu")
    d = Daemon(instance, free_port(), free_port(), workers=2)
    d.start()
    yield d
    if d.proc and d.proc.poll() is None:
        d.kill9()


def site_paths(config: Path) -> dict[str, Path]:
    return {"site-a": config.parent / "sites" / "a", "site-b": config.parent / "sites" / "b"}


@pytest.fixture(scope="session")
def pg_server():
    """One real PostgreSQL per test session (catalog suite and serve-on-PostgreSQL)."""
    pg.require_pg()
    server = pg.shared_server()
    yield server
    pg.stop_shared()
