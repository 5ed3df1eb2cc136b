"""A real syslog collector for the ATNA tests: Debian's rsyslogd receiving RFC 5425
(syslog over TLS, octet-counted) with its GnuTLS driver, writing each message's MSG
on one line of a file (control characters escaped as rsyslog does by default)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.support.needs import missing
from tests.support.pki import Pki

RSYSLOGD = "/usr/sbin/rsyslogd"


class Rsyslog:
    def __init__(self, d: Path, port: int, pki: Pki) -> None:
        if not os.path.exists(RSYSLOGD):
            missing("rsyslog not installed (Debian packages rsyslog, rsyslog-gnutls)")
        self.d, self.port = d, port
        d.mkdir(parents=True, exist_ok=True)
        (d / "work").mkdir(exist_ok=True)
        self.out = d / "atna.log"
        self.conf = d / "rsyslog.conf"
        self.conf.write_text(f'''
global(workDirectory="{d / 'work'}" maxMessageSize="64k"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{pki.ca}"
       defaultNetstreamDriverCertFile="{pki.server_cert}"
       defaultNetstreamDriverKeyFile="{pki.server_key}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode="anon")
input(type="imtcp" port="{port}" address="127.0.0.1")
template(name="msgonly" type="string" string="%msg%\\n")
action(type="omfile" file="{self.out}" template="msgonly")
''')
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> "Rsyslog":
        log = open(self.d / "rsyslogd.log", "ab")
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.conf), "-i",
                                      str(self.d / "rsyslogd.pid")],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        import socket
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("rsyslogd exited: "
                                     + (self.d / "rsyslogd.log").read_text(errors="replace"))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError("rsyslogd did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        self.proc = None

    def record_ids(self) -> list[int]:
        """The audit record position each received AuditMessage carries, in arrival order."""
        if not self.out.exists():
            return []
        ids = []
        for line in self.out.read_text(errors="replace").splitlines():
            xml = line.replace("#012", "\n")
            start = xml.find("<AuditMessage")
            if start < 0:
                continue
            root = ET.fromstring(xml[start:])
            for o in root.iter("ParticipantObjectIdentification"):
                if o.get("ParticipantObjectTypeCodeRole") == "13":
                    ids.append(int(o.get("ParticipantObjectID")))
        return ids


def have_rsyslog() -> bool:
    return os.path.exists(RSYSLOGD) and shutil.which("openssl") is not None
