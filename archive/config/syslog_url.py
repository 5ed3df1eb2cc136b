"""The [audit] syslog collector address, as written in the config."""
from __future__ import annotations

from urllib.parse import urlsplit


def parse_url(url: str) -> tuple[str, str, int]:
    """("udp" | "tls", host, port) from udp://host:port or tls://host:port ([v6] too)."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as e:
        raise ValueError(f"not a valid collector address: {e}") from None
    if u.scheme not in ("udp", "tls") or not u.hostname or port is None:
        raise ValueError("must be udp://host:port or tls://host:port")
    if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
        raise ValueError("must be udp://host:port or tls://host:port (nothing after the port)")
    return u.scheme, u.hostname, port
