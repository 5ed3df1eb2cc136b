"""A real, throwaway PostgreSQL server on loopback for the catalog tests.

``PgServer.start()`` makes a temporary data directory, runs ``initdb`` (trust
authentication, UTF-8, fsync off: test data need not survive a power cut),
starts ``postgres`` on 127.0.0.1 and a free port with its socket in the temp
directory, and waits until it accepts connections. ``create_database()`` hands
out a fresh database and its SQLAlchemy URL; ``stop()`` stops the server with
``pg_ctl -m immediate`` and removes the directory.

PostgreSQL refuses to run as root: when we are root every server command runs
as the ``postgres`` user (``runuser``) and the directory is chowned to it;
otherwise the commands run as ourselves.
"""
from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SERVER_USER = "postgres"   # the OS account that runs the server when we are root
DB_USER = "postgres"       # the database superuser initdb creates


class PgUnavailable(RuntimeError):
    """The PostgreSQL server binaries (or a way to run them) are missing."""


def find_bindir() -> Path | None:
    """Directory holding initdb, pg_ctl and postgres; PG_BINDIR overrides."""
    candidates: list[str] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(os.environ["PG_BINDIR"])
    # Debian keeps the server binaries out of PATH, one directory per major version.
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
                         reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True,
                                             text=True, timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    for tool in ("initdb", "postgres"):
        found = shutil.which(tool)
        if found:
            candidates.append(str(Path(found).resolve().parent))
    for c in candidates:
        if c and all((Path(c) / t).is_file() for t in ("initdb", "pg_ctl", "postgres")):
            return Path(c)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class PgServer:
    bindir: Path
    root: Path = field(default=None)  # type: ignore[assignment]
    port: int = 0
    _as_root: bool = False
    _dbs: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- paths ----------------------------------------------------------------
    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def sockdir(self) -> Path:
        return self.root / "sock"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    # -- process helpers -----------------------------------------------------------
    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / tool), *args]
        if self._as_root:
            return [shutil.which("runuser") or "runuser", "-u", SERVER_USER, "--", *cmd]
        return cmd

    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        # A clean, predictable environment: no PGDATA/PGPORT from the caller, C locale.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        p = subprocess.run(self._cmd(tool, *args), capture_output=True, text=True,
                           env=env, timeout=timeout, cwd=str(self.root))
        if p.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} exited {p.returncode}:\n"
                               f"{p.stdout}\n{p.stderr}\n{self.log()[-4000:]}")
        return p

    # -- life cycle -----------------------------------------------------------------
    @classmethod
    def start(cls, bindir: Path | None = None, *, attempts: int = 3) -> "PgServer":
        bindir = bindir or find_bindir()
        if bindir is None:
            raise PgUnavailable("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found")
        srv = cls(bindir=bindir)
        srv._as_root = os.geteuid() == 0
        if srv._as_root and shutil.which("runuser") is None:
            raise PgUnavailable("running as root but runuser is missing")
        # Not under pytest's tmp_path: its parents are mode 0700 and owned by root,
        # so the postgres user could not reach a directory below them.
        srv.root = Path(tempfile.mkdtemp(prefix="pacsvault-pg-"))
        try:
            srv.sockdir.mkdir()
            if srv._as_root:
                import pwd

                pw = pwd.getpwnam(SERVER_USER)
                for p in (srv.root, srv.sockdir):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
            srv._run("initdb", "-D", str(srv.datadir), "-U", DB_USER, "--auth=trust",
                     "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions")
            last = ""
            for _ in range(attempts):
                srv.port = _free_port()
                try:
                    srv._start_server()
                    break
                except RuntimeError as e:  # most likely the port was taken meanwhile
                    last = str(e)
                    srv._kill_quietly()
            else:
                raise RuntimeError(f"PostgreSQL did not start:\n{last}")
        except BaseException:
            srv.stop()
            raise
        atexit.register(srv.stop)
        return srv

    def _start_server(self) -> None:
        opts = " ".join([
            "-c listen_addresses=127.0.0.1", f"-p {self.port}", f"-k {self.sockdir}",
            # Test speed: nothing here must survive a crash of the machine.
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
            "-c max_connections=200", "-c shared_buffers=128MB",
        ])
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.datadir),
                  "-l", str(self.logfile), "-o", opts)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if _port_open(self.port):
                try:
                    with psycopg.connect(self.dsn("postgres"), connect_timeout=2) as c:
                        c.execute("SELECT 1")
                    return
                except psycopg.Error as e:
                    last = e
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL on port {self.port} not ready: {last}\n{self.log()[-4000:]}")

    def _kill_quietly(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", str(self.datadir),
                          timeout=60)
            except Exception:
                pass

    def stop(self) -> None:
        """Stop the server (immediate mode: no checkpoint) and delete everything."""
        with self._lock:
            if self.root is None or not self.root.exists():
                return
            self._kill_quietly()
            shutil.rmtree(self.root, ignore_errors=True)

    # -- databases ----------------------------------------------------------------
    def dsn(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={DB_USER} dbname={dbname}"

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """CREATE DATABASE (UTF-8) and return its SQLAlchemy URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:16]}"
        if not name.replace("_", "").isalnum():
            raise ValueError("database name must be alphanumeric")
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'')
        self._dbs.append(name)
        return self.url(name)

    def drop_database(self, name_or_url: str) -> None:
        import psycopg

        name = name_or_url.rsplit("/", 1)[-1]
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# One server per test process, shared by every module that needs PostgreSQL.
_shared: PgServer | None = None
_shared_lock = threading.Lock()


def shared_server() -> PgServer:
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.root.exists():
            _shared = PgServer.start()
        return _shared


def stop_shared() -> None:
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.stop()
            _shared = None


def require_pg() -> Path:
    """The PostgreSQL bindir; skips the test when absent, but FAILS it under CI=true."""
    from tests.support.needs import missing

    bindir = find_bindir()
    if bindir is None:
        missing("PostgreSQL server binaries not installed (or set PG_BINDIR)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        missing("running as root needs runuser to start PostgreSQL as 'postgres'")
    return bindir
