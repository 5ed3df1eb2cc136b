"""Refused associations reach the log once a minute per source and reason, and at most
WARNINGS_PER_SOURCE lines a minute per source, however the refusals vary."""
import logging
import threading
from types import SimpleNamespace

from archive.daemon import engine_scp
from archive.daemon.engine_scp import WARNINGS_PER_SOURCE, EngineListener


def listener() -> SimpleNamespace:
    return SimpleNamespace(lock=threading.Lock(), _warned={}, _per_source={})


def warn(lst, address: str, reason: str) -> None:
    EngineListener.warn_once_a_minute(lst, ("peer", address, reason), "refused: %s", reason)


def test_each_reason_once_a_minute_and_a_cap_per_source(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(engine_scp.time, "monotonic", lambda: now[0])
    lst = listener()
    with caplog.at_level(logging.WARNING, logger="pacsvault.dicom"):
        for _ in range(50):
            warn(lst, "10.0.0.1", "calling AE STRANGER is not a known peer")
        warn(lst, "10.0.0.1", "ELSEWHERE not allowed from 10.0.0.1")     # another reason
        for i in range(100):                                             # varying AE titles
            warn(lst, "10.0.0.9", f"calling AE X{i} is not a known peer")
        warn(lst, "10.0.0.2", "another source still gets its line")
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("refused: calling AE STRANGER is not a known peer") == 1
    assert "refused: ELSEWHERE not allowed from 10.0.0.1" in lines
    assert sum("10.0.0.9" in x or " X" in x for x in lines) == WARNINGS_PER_SOURCE
    assert "refused: another source still gets its line" in lines
    caplog.clear()
    now[0] += 61                                    # a minute on: logged again, with a count
    with caplog.at_level(logging.WARNING, logger="pacsvault.dicom"):
        warn(lst, "10.0.0.1", "calling AE STRANGER is not a known peer")
    assert caplog.records[0].getMessage() == ("refused: calling AE STRANGER is not a known peer"
                                              " (49 more like it in the last minute)")
