"""Back-off per source for failed log-ins on the HTTP endpoint.

Failures there never lock an account (any local process could lock an operator
out); they slow down the address that makes them instead. A source gets ``free``
failures, then must wait ``base_s``, doubling with each further failure up to
``max_s``; it is forgotten ``forget_s`` after its last failure. At most
``max_sources`` are remembered (the least recently failing is dropped first),
so a flood of addresses costs bounded memory. IPv6 sources count per /64, the
block one host usually holds.
"""
from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable


@dataclass
class _Source:
    failures: int
    blocked_until: float
    last_failure: float


def source_key(address: str) -> str:
    """The unit throttled: an IPv4 address, an IPv6 /64, or the text as given."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class SourceThrottle:
    def __init__(self, *, free: int = 5, base_s: float = 1.0, max_s: float = 300.0,
                 forget_s: float = 900.0, max_sources: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.base_s, self.max_s = free, base_s, max_s
        self.forget_s, self.max_sources = forget_s, max_sources
        self._clock = clock
        self._lock = threading.Lock()
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def retry_after(self, address: str) -> float:
        """Seconds before this source may try again (0: now)."""
        now = self._clock()
        with self._lock:
            s = self._sources.get(source_key(address))
            return max(0.0, s.blocked_until - now) if s is not None else 0.0

    def failed(self, address: str) -> None:
        key, now = source_key(address), self._clock()
        with self._lock:
            s = self._sources.pop(key, None)
            if s is None or now - s.last_failure > self.forget_s:
                s = _Source(0, 0.0, now)
            s.failures += 1
            s.last_failure = now
            if s.failures >= self.free:
                s.blocked_until = now + min(self.base_s * 2 ** (s.failures - self.free),
                                            self.max_s)
            self._sources[key] = s                       # newest last
            while len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)

    def __len__(self) -> int:
        return len(self._sources)
