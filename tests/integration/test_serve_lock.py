"""One `pacsvault serve` per instance, and a port that something else holds is named
by its key: real daemons, real sockets."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.daemon import PACSVAULT, Daemon, free_port, init_instance

# A second serve that is not refused keeps running: give it this long to say no.
REFUSAL_S = 40


def second_serve(config: Path, dicom_port: int, http_port: int) -> subprocess.CompletedProcess:
    """`pacsvault serve` that must exit on its own; killed (and reported) if it runs."""
    p = subprocess.Popen([PACSVAULT, "--config", str(config), "serve", "--dicom-port",
                          str(dicom_port), "--http-port", str(http_port), "--workers", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=REFUSAL_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"a second serve kept running (it joined the port):\n{err[-2000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def first(instance):
    d = Daemon(instance, free_port(), free_port(), workers=1).start()
    yield d
    d.kill9()


def test_a_second_serve_of_the_same_instance_is_refused_with_the_first_ones_pid(first):
    # Same ports: it would have joined through SO_REUSEPORT. Other ports: a second daemon.
    for dicom, http in ((first.dicom_port, first.http_port), (free_port(), free_port())):
        p = second_serve(first.config, dicom, http)
        assert p.returncode != 0
        line = one_line(p.stderr)
        assert "another pacsvault serve" in line and f"pid {first.proc.pid}" in line, line
    assert first.proc.poll() is None                        # the first one is untouched


def test_the_lock_goes_with_a_killed_daemon(first):
    first.kill9()
    again = Daemon(first.config, first.dicom_port, first.http_port, workers=1).start()
    assert again.stop() == 0


def test_a_port_held_by_another_program_is_named_by_its_key(instance, tmp_path):
    for key, reuseport in (("dicom.port", False), ("dicom.port", True), ("http.port", False)):
        squatter = socket.socket()
        if reuseport:   # a program that shares by SO_REUSEPORT (another instance of ours)
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        try:
            ports = (busy, free_port()) if key == "dicom.port" else (free_port(), busy)
            p = second_serve(instance, *ports)
        finally:
            squatter.close()
        assert p.returncode == 3, p.stderr
        line = one_line(p.stderr)
        assert key in line and str(busy) in line and "in use" in line, line


def test_a_second_instance_on_the_same_port_does_not_join_the_first(first, tmp_path):
    other = init_instance(tmp_path / "other")
    p = second_serve(other, first.dicom_port, free_port())
    assert p.returncode == 3
    line = one_line(p.stderr)
    assert "dicom.port" in line and str(first.dicom_port) in line, line
    assert first.proc.poll() is None
