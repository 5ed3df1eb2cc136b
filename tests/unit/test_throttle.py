"""The HTTP log-in throttle: back-off per source that doubles, is capped and forgotten,
memory bounded however many addresses fail, IPv6 counted per /64."""
from __future__ import annotations

from archive.daemon.throttle import SourceThrottle


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_back_off_doubles_is_capped_and_is_forgotten():
    c = Clock()
    t = SourceThrottle(free=3, base_s=1, max_s=8, forget_s=60, clock=c)
    for _ in range(2):
        t.failed("10.0.0.1")
    assert t.retry_after("10.0.0.1") == 0                 # within the free failures
    waits = []
    for _ in range(6):
        t.failed("10.0.0.1")
        waits.append(t.retry_after("10.0.0.1"))
    assert waits == [1, 2, 4, 8, 8, 8]
    assert t.retry_after("10.0.0.2") == 0                 # another source is not slowed
    c.t += 61
    t.failed("10.0.0.1")                                   # a fresh start after forget_s
    assert t.retry_after("10.0.0.1") == 0


def test_memory_is_bounded_and_ipv6_counts_per_64():
    t = SourceThrottle(free=1, max_sources=100, clock=Clock())
    for n in range(10_000):
        t.failed(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
    assert len(t) == 100
    t.failed("2001:db8:1:2::1")
    assert t.retry_after("2001:db8:1:2:ffff::9") > 0       # same /64
    assert t.retry_after("2001:db8:1:3::1") == 0
    assert t.retry_after("::ffff:10.0.39.15") > 0           # IPv4-mapped: the IPv4 source
