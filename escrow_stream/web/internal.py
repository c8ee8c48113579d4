"""Requests between workers, and who the client is behind a proxy.

Workers call each other over the public API: a read routed to the escrow's owner, and the
polls of ``Prefer: wait``.  Such a request carries ``X-Escrow-Internal: {unix seconds}.{hex
HMAC-SHA256}`` over ``{seconds}\\n{METHOD}\\n{path?query}``, keyed with
``INTERNAL_COMMAND_SECRET``; within ``INTERNAL_WINDOW_S`` of the receiver's clock it is
exempt from the public per-IP and per-user rate limits (it still authenticates as the
original caller, whose Authorization header it forwards).  An unsigned or stale one is an
ordinary request.

The client's address is ``request.remote``, unless that is a proxy in ``TRUSTED_PROXIES``:
then it is the right-most ``X-Forwarded-For`` hop that is not a trusted proxy.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Sequence
from typing import Any

from escrow_stream.config import Network

INTERNAL_HEADER = "X-Escrow-Internal"
#: Key in the aiohttp request of a verified worker-to-worker request.
INTERNAL_REQUEST_KEY = "escrow_internal"
INTERNAL_WINDOW_S = 60


def _mac(secret: str, seconds: int, method: str, path_qs: str) -> str:
    message = f"{seconds}\n{method.upper()}\n{path_qs}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def internal_headers(secret: str, method: str, path_qs: str, now_s: float) -> dict[str, str]:
    """The header a worker adds to a request it sends to another worker."""
    seconds = int(now_s)
    return {INTERNAL_HEADER: f"{seconds}.{_mac(secret, seconds, method, path_qs)}"}


def is_internal(secret: str, header: str | None, method: str, path_qs: str, now_s: float) -> bool:
    """Whether ``header`` signs this request, within the window (constant-time compare)."""
    if not header:
        return False
    seconds_text, _, given = header.partition(".")
    try:
        seconds = int(seconds_text)
    except ValueError:
        return False
    if abs(now_s - seconds) > INTERNAL_WINDOW_S:
        return False
    expected = _mac(secret, seconds, method, path_qs)
    return hmac.compare_digest(expected.encode(), given.strip().lower().encode())


def client_ip(remote: str | None, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The client's address: ``remote``, or through trusted proxies the first untrusted hop
    of ``X-Forwarded-For`` counted from the right (hops left of it could be forged)."""
    if not remote:
        return "unknown"
    if not trusted or not _trusted(remote, trusted):
        return remote
    hops = [h.strip() for h in (forwarded_for or "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop
    return hops[0] if hops else remote


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip: Any = ipaddress.ip_address(address)
    except ValueError:
        return False  # not an address: never a trusted proxy
    return any(ip in network for network in trusted)
