"""The daemon's HTTP side: an ASGI application (Starlette) served by uvicorn in
a thread of the supervisor.

* ``/healthz`` (always open), ``/status`` and ``/api/v1/status`` (JSON),
  ``/metrics`` (Prometheus): accounts allowed to read.
* ``/dicomweb/``: QIDO-RS and WADO-RS (permission "view"), STOW-RS ("store"),
  the use cases of archive/app/dicomweb.py; this module only moves bytes.

Once the install has operator accounts every path but /healthz wants HTTP
Basic credentials (archive/daemon/http.py's AccountGate: wrong ones are
throttled per source, 429 with Retry-After, and never lock the account). It
binds to loopback by default; off loopback it serves HTTPS only, unless the
config says the network is trusted. Error bodies never carry a value from the
request.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import anyio
import h11
import pydicom
import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import (
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from archive import audit
from archive.app import dicomweb as W
from archive.daemon.http import AccountGate, _StatusCollector
from archive.dicom import dicom_json as dj
from archive.dicom import multipart as mp
from archive.dicom.part10 import SentMeta, file_meta, read_sent_meta
from archive.errors import InvalidInput

log = logging.getLogger("pacsvault.http")

DICOM_JSON = "application/dicom+json"
CHUNK = 1024 * 1024
IN_MEMORY_PART = 4 * 1024 * 1024      # a STOW part smaller than this never touches the spool


def _text(code: int, message: str, **headers: str) -> Response:
    return PlainTextResponse(message.rstrip("\n") + "\n", status_code=code,
                             headers={k.replace("_", "-"): v for k, v in headers.items()})


class WebApp:
    """The routes, with what they need: the status snapshot, the gate and (when the
    daemon serves DICOMweb) its service and a spool directory for STOW parts."""

    def __init__(self, status: Callable[[], dict[str, Any]], gate: AccountGate | None,
                 dicomweb: W.DicomWebService | None = None, spool: Path | None = None,
                 stow_max_bytes: int = 4 * 1024**3) -> None:
        self.status, self.gate, self.dicomweb = status, gate, dicomweb
        self.spool, self.stow_max_bytes = spool, stow_max_bytes
        self.registry = CollectorRegistry()
        self.registry.register(_StatusCollector(status))

    def routes(self) -> list[Route]:
        base = "/dicomweb"
        s, se, i = "{study}", "{series}", "{instance}"
        return [
            Route("/healthz", lambda r: _text(200, "ok")),
            Route("/status", self.get_status),
            Route("/api/v1/status", self.get_status),
            Route("/metrics", self.get_metrics),
            Route(f"{base}/studies", self.studies, methods=["GET", "POST"]),
            Route(f"{base}/series", self.qido),
            Route(f"{base}/instances", self.qido),
            Route(f"{base}/studies/{s}", self.study, methods=["GET", "POST"]),
            Route(f"{base}/studies/{s}/metadata", self.metadata),
            Route(f"{base}/studies/{s}/series", self.qido),
            Route(f"{base}/studies/{s}/instances", self.qido),
            Route(f"{base}/studies/{s}/series/{se}", self.wado),
            Route(f"{base}/studies/{s}/series/{se}/metadata", self.metadata),
            Route(f"{base}/studies/{s}/series/{se}/instances", self.qido),
            Route(f"{base}/studies/{s}/series/{se}/instances/{i}", self.wado),
            Route(f"{base}/studies/{s}/series/{se}/instances/{i}/metadata", self.metadata),
        ]

    # -- who is asking ------------------------------------------------------------------------
    async def _who(self, request: Request, permission: str) -> W.Who | Response:
        source = request.client.host if request.client else "?"
        if self.gate is None:
            return W.Who("-", source)
        code, wait, user = await anyio.to_thread.run_sync(
            self.gate.authorize, request.headers.get("authorization"), source, permission)
        if code == 200:
            return W.Who(user, source)
        if code == 429:
            return _text(429, "too many failed log-ins from this address; retry later",
                         Retry_After=str(max(1, math.ceil(wait))))
        if code == 403:
            return _text(403, f"this account's role does not allow '{permission}'")
        return _text(401, "credentials of an account allowed to do this are needed",
                     WWW_Authenticate='Basic realm="pacsvault"')

    # -- status and metrics ----------------------------------------------------------------------
    async def get_status(self, request: Request) -> Response:
        who = await self._who(request, "read")
        if isinstance(who, Response):
            return who
        return Response(json.dumps(self.status()), media_type="application/json")

    async def get_metrics(self, request: Request) -> Response:
        who = await self._who(request, "read")
        if isinstance(who, Response):
            return who
        return Response(generate_latest(self.registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- DICOMweb --------------------------------------------------------------------------------
    def _base(self, request: Request) -> str:
        return str(request.base_url).rstrip("/") + "/dicomweb"

    async def studies(self, request: Request) -> Response:
        return await (self.stow(request) if request.method == "POST" else self.qido(request))

    async def study(self, request: Request) -> Response:
        return await (self.stow(request) if request.method == "POST" else self.wado(request))

    async def qido(self, request: Request) -> Response:
        if self.dicomweb is None:
            return _text(404, "DICOMweb is not served here")
        who = await self._who(request, "view")
        if isinstance(who, Response):
            return who
        path = request.url.path.rstrip("/")
        resource = path.rsplit("/", 1)[1]
        p = request.path_params
        try:
            answer = await anyio.to_thread.run_sync(lambda: self.dicomweb.search(
                resource, list(request.query_params.multi_items()), base_url=self._base(request),
                who=who, study=p.get("study"), series=p.get("series")))
        except W.WebRefused as e:
            return _text(e.status, e.message)
        headers = {"X-Total-Count": str(answer.total)}
        if answer.warnings:
            headers["Warning"] = ", ".join(answer.warnings)
        if not answer.matches:
            return Response(status_code=204, headers=headers)
        return Response(json.dumps(answer.matches), media_type=DICOM_JSON, headers=headers)

    async def _retrieval(self, request: Request) -> W.Retrieval | Response:
        if self.dicomweb is None:
            return _text(404, "DICOMweb is not served here")
        who = await self._who(request, "view")
        if isinstance(who, Response):
            return who
        p = request.path_params
        try:
            retrieval = await anyio.to_thread.run_sync(lambda: self.dicomweb.retrieve(
                p["study"], p.get("series"), p.get("instance"), who=who))
        except W.WebRefused as e:
            return _text(e.status, e.message)
        if not await anyio.to_thread.run_sync(retrieval.start):
            await anyio.to_thread.run_sync(retrieval.close)
            return _text(503, retrieval.progress.comment or "no instance could be read")
        return retrieval

    async def wado(self, request: Request) -> Response:
        refused = _acceptable(request.headers.get("accept", ""))
        if refused:
            return _text(406, refused)
        retrieval = await self._retrieval(request)
        if isinstance(retrieval, Response):
            return retrieval
        boundary = mp.new_boundary()

        def body() -> Iterator[bytes]:
            # Parts are gathered into chunks of about CHUNK bytes: every chunk crosses
            # from this thread to the event loop, which costs more than a small part.
            first, buf = True, bytearray()
            try:
                for inst, path in retrieval:
                    buf += mp.part_head(boundary, "application/dicom; transfer-syntax="
                                        + inst.transfer_syntax, first=first)
                    first = False
                    with open(path, "rb") as f:
                        while chunk := f.read(CHUNK - len(buf) if len(buf) < CHUNK else CHUNK):
                            buf += chunk
                            if len(buf) >= CHUNK:
                                yield bytes(buf)
                                buf.clear()
                if retrieval.complete:
                    buf += mp.closing(boundary)
                # else: no closing delimiter, so the client sees the response is cut
                # short rather than a study with instances silently missing
                if buf:
                    yield bytes(buf)
            finally:
                retrieval.close()

        return StreamingResponse(body(), media_type=f'multipart/related; '
                                 f'type="application/dicom"; boundary={boundary}')

    async def metadata(self, request: Request) -> Response:
        retrieval = await self._retrieval(request)
        if isinstance(retrieval, Response):
            return retrieval
        base = self._base(request)

        def body() -> Iterator[bytes]:
            # The data sets without their bulk data (pixel data and the like), each
            # read from a verified copy, as a JSON array built as it streams.
            first = True
            try:
                yield b"["
                for inst, path in retrieval:
                    url = (f"{base}/studies/{request.path_params['study']}/series/"
                           f"{inst.series_uid}/instances/{inst.sop_uid}")
                    doc = dj.dataset_to_json(_read_header(path), None)
                    doc.setdefault("00081190", {"vr": "UR", "Value": [url]})
                    yield (b"" if first else b",") + json.dumps(doc).encode()
                    first = False
                if retrieval.complete:
                    yield b"]"
            finally:
                retrieval.close()

        return StreamingResponse(body(), media_type=DICOM_JSON)

    async def stow(self, request: Request) -> Response:
        if self.dicomweb is None or self.dicomweb.ingest is None or self.spool is None:
            return _text(404, "DICOMweb STOW-RS is not served here")
        who = await self._who(request, "store")
        if isinstance(who, Response):
            return who
        try:
            boundary, part_type = mp.related_boundary(request.headers.get("content-type", ""))
        except InvalidInput as e:
            return _text(415, f"{e} (send multipart/related; type=\"application/dicom\")")
        if part_type.split(";")[0].strip().lower() != "application/dicom":
            return _text(415, "only application/dicom parts are stored (no JSON/XML + bulk "
                         "data form)")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.stow_max_bytes:
            return _text(413, f"the body is larger than [http] stow_max_bytes "
                         f"({self.stow_max_bytes} bytes)")
        study = request.path_params.get("study")
        if study is not None:
            try:
                study = W.path_uid(study)
            except W.WebRefused as e:
                return _text(e.status, e.message)
        stow = _Stow(self.dicomweb, self.spool, study)
        parser = mp.RelatedParser(boundary)
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > self.stow_max_bytes:
                    return _text(413, f"the body is larger than [http] stow_max_bytes "
                                 f"({self.stow_max_bytes} bytes); the parts before the limit "
                                 f"were stored: {len(stow.parts)} (see the audit trail)")
                for event in parser.feed(chunk):
                    await stow.on(event)
            parser.close()
        except InvalidInput as e:
            stow.discard()
            return _text(400, f"{e}; {stow.stored} instances before it were stored")
        except ClientDisconnect:   # gone, or cut off for stalling: nobody to answer
            log.warning("STOW-RS from %s ended before its body did; %d instances before it "
                        "were stored", who.source, stow.stored)
            return Response(status_code=400)
        finally:
            stow.discard()
            await anyio.to_thread.run_sync(stow.audit, who)
        doc = W.store_response(stow.parts, stow.refused, lambda p: stow.url(
            self._base(request), p))
        if not stow.parts and not stow.refused:
            return _text(400, "the body holds no part")
        failed = len(stow.refused) + sum(1 for p in stow.parts if not p.result.acknowledged)
        code = 200 if not failed else 409 if failed == len(stow.parts) + len(stow.refused) \
            else 202
        return Response(json.dumps(doc), status_code=code, media_type=DICOM_JSON)


class _Stow:
    """One STOW-RS request's parts: each one's meta group is read as it arrives; the
    data set goes to memory (small) or a spool file, behind pacsvault's own meta,
    and is stored through the C-STORE path when the part ends."""

    def __init__(self, service: W.DicomWebService, spool: Path, study: str | None) -> None:
        self.service, self.spool, self.study = service, spool, study
        self.parts: list[W.StoredPart] = []
        self.refused: list[tuple[str, str, int]] = []
        self.studies: dict[str, dict] = {}
        self._reset()

    def _reset(self) -> None:
        self.head = bytearray()
        self.meta: SentMeta | None = None
        self.skip = False
        self.buffer: bytearray | None = None
        self.file = None
        self.path: Path | None = None

    @property
    def stored(self) -> int:
        return sum(1 for p in self.parts if p.result.acknowledged)

    async def on(self, event: object) -> None:
        if isinstance(event, mp.PartStart):
            self._reset()
            ctype = event.headers.get("content-type", "application/dicom")
            self.skip = ctype.split(";")[0].strip().lower() != "application/dicom"
            if self.skip:
                self.refused.append(("", "", W.PROCESSING_FAILURE))
        elif isinstance(event, mp.PartData) and not self.skip:
            await self._data(event.data)
        elif isinstance(event, mp.PartEnd) and not self.skip:
            await self._end()

    async def _data(self, data: bytes) -> None:
        if self.meta is None:
            self.head += data
            try:
                self.meta = read_sent_meta(bytes(self.head))
            except InvalidInput:
                self.skip = True
                self.refused.append(("", "", 0xC000))
                return
            if self.meta is None:
                return
            data = bytes(self.head[self.meta.dataset_offset:])
            self.buffer = bytearray(file_meta(self.meta.sop_class, self.meta.sop_instance,
                                              self.meta.transfer_syntax))
        assert self.buffer is not None
        self.buffer += data
        if len(self.buffer) >= IN_MEMORY_PART:
            await anyio.to_thread.run_sync(self._spill)

    def _spill(self) -> None:
        if self.file is None:
            self.spool.mkdir(parents=True, exist_ok=True)
            # Named as our temp files are: a crash's leftovers are swept at start-up.
            fd, name = tempfile.mkstemp(suffix=".stow.tmp", dir=self.spool)
            self.path = Path(name)
            self.file = os.fdopen(fd, "wb")
        self.file.write(self.buffer)
        self.buffer = bytearray()

    async def _end(self) -> None:
        if self.meta is None:
            try:
                self.meta = read_sent_meta(bytes(self.head), final=True)
            except InvalidInput:
                self.meta = None
            self.refused.append(("", "", 0xC000))
            return
        meta = self.meta
        part = await anyio.to_thread.run_sync(self._store, meta)
        if part is None:
            self.refused.append((meta.sop_class, meta.sop_instance, W.NOT_THIS_STUDY))
            return
        self.parts.append(part)
        r = part.result
        if r.study_uid is not None:
            st = self.studies.setdefault(r.study_uid, {"patient_id": r.patient_id,
                                                       "stored": 0, "refused": 0})
            st["stored" if r.acknowledged else "refused"] += 1

    def _store(self, meta: SentMeta) -> W.StoredPart | None:
        try:
            if self.file is not None:
                self._spill()
                self.file.close()
                self.file = None
            source = self.path if self.path is not None else io.BytesIO(self.buffer or b"")
            if self.study is not None and _study_of(source) != self.study:
                # POST /studies/{study}: an instance of another study is refused unstored
                return None
            if self.path is not None:
                return W.store_part(self.service.ingest, meta, spool=self.path)
            return W.store_part(self.service.ingest, meta, data=bytes(self.buffer or b""))
        finally:
            self.discard()

    def url(self, base: str, p: W.StoredPart) -> str:
        r = p.result
        if r.study_uid:
            return f"{base}/studies/{r.study_uid}"
        return base

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def audit(self, who: W.Who) -> None:
        for uid, st in self.studies.items():
            audit.record_quietly(self.service.catalog, audit.Event(
                "object-received", "failure" if st["refused"] else "success", who.user,
                f"http {who.source}", st["patient_id"], uid,
                {"stored": st["stored"], "refused": st["refused"], "service": "STOW-RS"}))


def _acceptable(accept: str) -> str:
    """'' if a WADO-RS response as stored can be sent, else why not (406). We send
    each instance in the transfer syntax it was received in (never transcoded)."""
    if not accept.strip():
        return ""
    for item in accept.split(","):
        try:
            media, params = mp.parse_content_type(item)
        except InvalidInput:
            continue
        if media in ("*/*", "multipart/*"):
            return ""
        if media == "multipart/related" and params.get("type", "application/dicom").lower() \
                in ("application/dicom", "application/*", "*/*"):
            return ""      # any transfer-syntax asked for gets the stored one (conformance.md)
    return ("this server sends instances as multipart/related; type=\"application/dicom\" "
            "in their stored transfer syntax")


def _study_of(source) -> str | None:  # noqa: ANN001 - a path or a file object
    try:
        ds = pydicom.dcmread(source, stop_before_pixels=True, force=True,
                             specific_tags=["StudyInstanceUID"])
        return str(ds.get("StudyInstanceUID", "")) or None
    except Exception:  # noqa: BLE001 - unreadable: ingest refuses it with its reason
        return None


def _read_header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True, force=True)


class _GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the timeouts it lacks: a request's head must
    arrive whole within ``request_timeout_s`` of the connection (or of the previous
    response), and a body must not stall longer than that between two reads. Without
    them a client sending a byte now and then holds a connection (and a slot of
    max_concurrency) for ever."""

    request_timeout_s = 30.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # noqa: ANN001
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.SEND_BODY:
            self._arm()                  # the body is coming: each read restarts the clock
        elif self.conn.their_state is not h11.IDLE:
            self._disarm()               # the request is in; the answer takes its time

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()                  # the next request's head, on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        if not self.transport.is_closing():
            log.warning("HTTP connection from %s closed: no complete request within %.0f s",
                        self.client[0] if self.client else "?", self.request_timeout_s)
            self.transport.close()


class WebServer:
    """uvicorn running the app in its own thread and event loop."""

    def __init__(self, app: WebApp, bind: str, port: int,
                 ssl_context: ssl.SSLContext | None = None, max_concurrency: int = 64,
                 request_timeout_s: float = 30.0) -> None:
        starlette = Starlette(routes=app.routes())
        kw: dict[str, Any] = {}
        if ssl_context is not None:
            kw["ssl_context_factory"] = lambda config, default: ssl_context
        protocol = type("GuardedH11", (_GuardedH11,), {"request_timeout_s": request_timeout_s})
        config = uvicorn.Config(starlette, host=bind, port=port, log_config=None,
                                log_level="warning", access_log=False, lifespan="off",
                                http=protocol, ws="none", loop="asyncio", server_header=False,
                                timeout_keep_alive=5, limit_concurrency=max_concurrency,
                                h11_max_incomplete_event_size=16 * 1024, **kw)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        while not self.server.started and self._thread.is_alive():
            self._thread.join(0.02)
        if not self.server.started:
            raise OSError(f"the HTTP server did not start on {bind}:{port}")

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def shutdown(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


