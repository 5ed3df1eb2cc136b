"""`pacsvault serve`: the supervisor process and its DICOM worker processes.

The supervisor migrates the catalog, sweeps the spool and the sites' temp
directories (a crash may have left patient data there), starts N DICOM workers
that share the port (SO_REUSEPORT), runs the repair loop and the HTTP endpoint,
and restarts a worker that dies. SIGTERM: workers stop accepting, let open
associations finish (up to dicom.shutdown_grace_s), then everything exits 0.
Workers die with the supervisor (PR_SET_PDEATHSIG), so kill -9 of the
supervisor is a clean model of a power cut.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import threading
import time

from archive import atna, audit
from archive import spool as spool_area
from archive.alerts import send_alert
from archive.app.compose import open_catalog, open_object_tier_or_none, open_sites
from archive.app.dicomweb import DicomWebService
from archive.app.find import FindService
from archive.app.ingest import IngestService
from archive.app.retrieve import MoveService
from archive.app.status import collect
from archive.app.watch import Watch
from archive.config.paths import site_risks
from archive.config.schema import Settings
from archive.daemon.dicom_scp import configure_pynetdicom, start_listener
from archive.daemon.engine_scp import EngineListener
from archive.daemon.http import AccountGate
from archive.daemon.ports import check_free
from archive.daemon.scheduler import start_scheduler
from archive.daemon.tls import server_context, warn_if_key_exposed
from archive.errors import ConfigError
from archive.instance_lock import hold_instance_lock
from archive.peers import PeerRegistry
from replication.in_flight import settle_in_flight
from replication.mirror import MirrorWriter
from replication.repair import repair_missing

log = logging.getLogger("pacsvault.serve")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # pydicom's warnings quote the values they complain about: patient data.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _audit_setup(settings: Settings) -> None:
    """Every process that writes audit records signs checkpoints and, if configured,
    sends each record to the audit collector (workers are spawned: each needs it)."""

    audit.configure(settings.data_dir)
    atna.install(settings)


def worker_main(settings: Settings, port: int, index: int, ready: "mp.Queue | None") -> None:
    """One DICOM worker: listener + ingest. Runs until SIGTERM."""
    _die_with_parent()
    setup_logging()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    spool = settings.ingest.spool_dir / f"w{index}"
    spool.mkdir(mode=0o750, exist_ok=True)
    spool_area.sweep(settings.ingest.spool_dir, spool.name)
    configure_pynetdicom(spool, settings.dicom.reactor_sleep_s)
    _audit_setup(settings)
    catalog = open_catalog(settings)
    mirror = MirrorWriter(open_sites(settings), timeout_s=settings.ingest.site_timeout_s,
                          retry_after_s=settings.ingest.site_retry_after_s)
    ingest = IngestService(catalog, mirror, min_copies=settings.ingest.min_copies)
    peers = PeerRegistry(catalog, settings.dicom.allow_any_peer)
    d = settings.dicom
    finder = FindService(catalog, ae_title=d.ae_title, max_matches=d.max_query_matches,
                         case_insensitive_pn=d.query_case_insensitive_pn)
    mover = MoveService(catalog, mirror.sites, open_object_tier_or_none(settings),
                        ae_title=d.ae_title, scratch=spool / "move",
                        alert=lambda a: send_alert(settings.alerts, a))
    listeners = []  # the plain port, the TLS port, or both
    ctx = server_context(d.tls_cert, d.tls_key, d.tls_ca, d.tls_require_client_cert,
                         what="dicom.tls") if d.tls_port else None
    ports = ([(port, None)] if not d.tls_only else []) + ([(d.tls_port, ctx)] if d.tls_port else [])
    for p, ssl_context in ports:
        if d.engine == "pacsvault":
            listeners.append(EngineListener(d, p, ingest, peers, spool, ssl_context=ssl_context,
                                            finder=finder, mover=mover))
        else:
            listeners.append(_PynetdicomListener(*start_listener(d, p, ingest, peers,
                                                                 ssl_context=ssl_context)))
    if ready is not None:
        ready.put(index)
    stop.wait()
    for listener in listeners:
        listener.shutdown()  # stop accepting; open associations carry on
    deadline = time.monotonic() + settings.dicom.shutdown_grace_s
    while any(listener.active for listener in listeners) and time.monotonic() < deadline:
        time.sleep(0.05)
    for listener in listeners:
        if listener.active:
            log.warning("aborting associations still open after the shutdown grace period")
            listener.abort_open()
    ingest.close()
    mirror.close()
    catalog.close()


class _PynetdicomListener:
    """The pynetdicom listener behind the same three calls as EngineListener."""

    def __init__(self, ae, server) -> None:  # noqa: ANN001
        self.ae, self.server = ae, server

    @property
    def active(self) -> int:
        return len(self.ae.active_associations)

    def shutdown(self) -> None:
        self.server.shutdown()

    def abort_open(self) -> None:
        for assoc in list(self.ae.active_associations):
            assoc.abort()


class _StatusSnapshot:
    """Status for /status and /metrics, recomputed in the background.

    Counting every copy is O(n) (tens of seconds at 10 million instances), so a
    Prometheus scrape must never trigger it: requests get the latest snapshot,
    which carries its own age.
    """

    def __init__(self, compute, stop: threading.Event, every_s: float = 30.0) -> None:  # noqa: ANN001
        self._compute = compute
        self._value: dict = {}
        self._lock = threading.Lock()
        self._refresh()
        threading.Thread(target=self._loop, args=(stop, every_s), name="status",
                         daemon=True).start()

    def _refresh(self) -> None:
        started = time.monotonic()
        try:
            value = self._compute()
        except Exception:
            log.exception("status refresh failed")
            return
        value["computed_in_s"] = round(time.monotonic() - started, 3)
        value["as_of_unix"] = time.time()
        with self._lock:
            self._value = value

    def _loop(self, stop: threading.Event, every_s: float) -> None:
        while not stop.wait(every_s):
            self._refresh()

    def get(self) -> dict:
        with self._lock:
            return dict(self._value)


class Supervisor:
    def __init__(self, settings: Settings, dicom_port: int, http_port: int, workers: int) -> None:
        self.settings = settings
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.workers = workers
        self.stop = threading.Event()
        self._procs: dict[int, mp.Process] = {}
        self._ctx = mp.get_context("spawn")
        self.watch: Watch | None = None

    def _spawn(self, index: int, ready: "mp.Queue") -> None:
        p = self._ctx.Process(target=worker_main, name=f"pacsvault-dicom-{index}",
                             args=(self.settings, self.dicom_port, index, ready), daemon=False)
        p.start()
        self._procs[index] = p

    def _repair_loop(self, catalog, sites) -> None:  # noqa: ANN001

        scratch = self.settings.ingest.spool_dir / "repair"
        # In-flight marks this old belong to no ingest still running (a worker that died).
        settled_after = max(60.0, 2 * self.settings.ingest.site_timeout_s)
        while not self.stop.wait(self.settings.ingest.repair_interval_s):
            try:
                settle_in_flight(catalog, sites, older_than_s=settled_after)
                repair_missing(catalog, sites, scratch)
            except Exception:
                log.exception("repair pass failed; will retry")

    def _watch_loop(self) -> None:
        while not self.stop.wait(self.settings.alerts.watch_interval_s):
            try:
                self.watch.check()
            except Exception:
                log.exception("watch failed; will look again")

    def run(self) -> int:

        s = self.settings
        # Before anything else: one daemon per instance, and no port shared by accident.
        self._lock_fd = hold_instance_lock(s.data_dir)
        self._check_ports()
        http_tls = self._check_tls()
        spool_area.ensure(s.ingest.spool_dir)     # refuses a directory that is not our spool
        _audit_setup(s)
        catalog = open_catalog(s, migrate=True)
        sites = open_sites(s)
        for site in sites:
            swept = site.sweep_temp()
            h = site.health()
            log.info("site %s at %s: %s%s", site.name, site.root, h.reason,
                     f" (removed {swept} temp files left by a crash)" if swept else "")
            if not h.ok:
                log.error("site %s is not usable: %s; accepting on the other sites, "
                          "copies will be repaired when it returns", site.name, h.reason)
        for risk in site_risks(s):
            log.warning("sites: %s", risk)
        swept = spool_area.sweep(s.ingest.spool_dir)
        if swept:
            log.info("spool: removed %d temp files left by a crash", swept)
        # Objects a crash left in flight, before any association is accepted. On SQLite the
        # instance lock means nobody else is writing; PostgreSQL may have other daemons.
        settle_in_flight(catalog, sites, older_than_s=0 if catalog.engine.dialect.name ==
                          "sqlite" else 2 * s.ingest.site_timeout_s)

        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())

        self.watch = Watch(s, catalog, sites, lambda a: send_alert(s.alerts, a))
        http = web_ingest = None
        if self.http_port:
            http, web_ingest = self._start_web(catalog, sites, http_tls)
        ready = self._ctx.Queue()
        for i in range(self.workers):
            self._spawn(i, ready)
        started = 0
        deadline = time.monotonic() + 60
        while started < self.workers and time.monotonic() < deadline and not self.stop.is_set():
            try:
                ready.get(timeout=0.5)
                started += 1
            except Exception:
                if any(not p.is_alive() for p in self._procs.values()):
                    log.error("a DICOM worker failed to start")
                    self._terminate()
                    return 1
        ports = ([] if s.dicom.tls_only else [str(self.dicom_port)]) + \
            ([f"{s.dicom.tls_port} (TLS)"] if s.dicom.tls_port else [])
        log.info("pacsvault listening: DICOM %s:%s as %s (%d workers, %s engine), HTTP%s %s",
                 s.dicom.bind, ", ".join(ports), s.dicom.ae_title, self.workers, s.dicom.engine,
                 "S" if http_tls else "",
                 f"{s.http.bind}:{self.http_port}" if self.http_port else "off")
        repair = threading.Thread(target=self._repair_loop, args=(catalog, sites),
                                  name="repair", daemon=True)
        repair.start()
        threading.Thread(target=self._watch_loop, name="watch", daemon=True).start()

        scheduler = start_scheduler(s, self.stop)
        while not self.stop.wait(1.0):
            for i, p in list(self._procs.items()):
                if not p.is_alive():
                    log.error("DICOM worker %d exited (code %s); restarting", i, p.exitcode)
                    self._spawn(i, ready)
        log.info("SIGTERM: finishing open associations")
        if scheduler is not None:
            scheduler.shutdown(wait=True)   # a running job stops after its current study
        self._terminate()
        if http is not None:
            http.shutdown()
        if web_ingest is not None:
            web_ingest.close()
            web_ingest.mirror.close()
        repair.join(timeout=10)
        catalog.close()
        log.info("pacsvault stopped")
        return 0

    def _start_web(self, catalog, sites, http_tls):  # noqa: ANN001, ANN202
        """The HTTP side: status, metrics and DICOMweb, whose STOW-RS stores through
        an ingest service of its own (the same rules as a DICOM worker's)."""
        from archive.daemon.web import WebApp, WebServer  # uvicorn only where served

        s = self.settings
        tier = open_object_tier_or_none(s)
        snapshot = _StatusSnapshot(lambda: collect(s, catalog, sites, tier=tier), self.stop)

        def current() -> dict:                # the watch's conditions as of now
            return {**snapshot.get(), "watch": self.watch.conditions() if self.watch else []}

        spool = s.ingest.spool_dir / "http"
        spool.mkdir(mode=0o750, exist_ok=True)
        mirror = MirrorWriter(open_sites(s), timeout_s=s.ingest.site_timeout_s,
                              retry_after_s=s.ingest.site_retry_after_s)
        ingest = IngestService(catalog, mirror, min_copies=s.ingest.min_copies)
        mover = MoveService(catalog, mirror.sites, tier, ae_title=s.dicom.ae_title,
                            scratch=spool / "wado", alert=lambda a: send_alert(s.alerts, a))
        service = DicomWebService(catalog, mover, ingest, max_matches=s.dicom.max_query_matches,
                                  case_insensitive_pn=s.dicom.query_case_insensitive_pn)
        app = WebApp(current, AccountGate(catalog, s.accounts), service, spool=spool,
                     stow_max_bytes=s.http.stow_max_bytes)
        server = WebServer(app, s.http.bind, self.http_port, http_tls,
                           max_concurrency=s.http.max_concurrency,
                           request_timeout_s=s.http.request_timeout_s)
        return server, ingest

    def _check_ports(self) -> None:
        d = self.settings.dicom
        if not d.tls_only:
            check_free("dicom.port", d.bind, self.dicom_port)
        if d.tls_port:
            check_free("dicom.tls_port", d.bind, d.tls_port)
        if self.http_port:
            check_free("http.port", self.settings.http.bind, self.http_port)

    def _check_tls(self):  # noqa: ANN202
        """Load every certificate now, so that a bad one stops start-up with a clear
        message instead of killing workers; returns the HTTPS context (or None)."""

        d, h = self.settings.dicom, self.settings.http
        if d.tls_port:
            if d.tls_port == self.dicom_port and not d.tls_only:
                # SO_REUSEPORT would let both bind it and split connections between them.
                raise ConfigError(f"dicom.tls_port {d.tls_port} is also the plain DICOM port")
            warn_if_key_exposed(d.tls_key)
            server_context(d.tls_cert, d.tls_key, d.tls_ca, d.tls_require_client_cert,
                           what="dicom.tls")
        if h.tls_cert is None or not self.http_port:
            return None
        warn_if_key_exposed(h.tls_key)
        return server_context(h.tls_cert, h.tls_key, what="http.tls")

    def _terminate(self) -> None:
        for p in self._procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        grace = self.settings.dicom.shutdown_grace_s + 15
        for p in self._procs.values():
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()
