"""HMAC signatures on system-role commands (SPEC §3, Trust).

The header ``x-escrow-signature`` carries the lowercase hex HMAC-SHA256 of the raw message
value bytes, keyed with ``INTERNAL_COMMAND_SECRET``.  Every producer of system commands
(gateway, webhooks, payments agent, timeout processor, outbox publisher) signs with
:func:`sign`; the command processor checks with :func:`verify`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

SIGNATURE_HEADER = "x-escrow-signature"

HeaderItems = Iterable[tuple[str, bytes]] | Mapping[str, bytes]


def sign(secret: str, value: bytes) -> str:
    return hmac.new(secret.encode(), value, hashlib.sha256).hexdigest()


def signature_headers(secret: str, value: bytes) -> list[tuple[str, bytes]]:
    return [(SIGNATURE_HEADER, sign(secret, value).encode())]


def header_value(headers: HeaderItems | None, name: str) -> bytes | None:
    """The last value of header ``name`` (case-insensitive), or None."""
    if not headers:
        return None
    items = headers.items() if isinstance(headers, Mapping) else headers
    found: bytes | None = None
    for key, value in items:
        if key.lower() == name:
            found = value if isinstance(value, bytes) else str(value).encode()
    return found


def verify(secret: str, value: bytes, headers: HeaderItems | None) -> bool:
    """True when the signature header matches the value (constant-time compare)."""
    given = header_value(headers, SIGNATURE_HEADER)
    if given is None:
        return False
    return hmac.compare_digest(given, sign(secret, value).encode())
