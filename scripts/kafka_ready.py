#!/usr/bin/env python3
"""Is a Kafka broker answering metadata requests?  (standard library only)

Usage: kafka_ready.py [HOST:PORT] [--timeout SECONDS]

Sends a Kafka MetadataRequest v0 (api_key 3) for all topics and parses the
response: correlation id and broker list.  Exit 0 and print the brokers when
at least one broker is registered, 1 otherwise.  Used by scripts/stack.sh so
the readiness check does not depend on the project's virtualenv.
"""
from __future__ import annotations

import socket
import struct
import sys

CORRELATION_ID = 0x45534352  # "ESCR"


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return buf


def metadata_brokers(host: str, port: int, timeout: float) -> list[tuple[int, str, int]]:
    client_id = b"escrow-stream-stack"
    # Request header v1: api_key, api_version, correlation_id, client_id
    # Body (v0): topics array; count 0 == all topics.
    payload = struct.pack(">hhih", 3, 0, CORRELATION_ID, len(client_id)) + client_id
    payload += struct.pack(">i", 0)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(payload)) + payload)
        (size,) = struct.unpack(">i", _read_exact(sock, 4))
        data = _read_exact(sock, size)
    (corr,) = struct.unpack_from(">i", data, 0)
    if corr != CORRELATION_ID:
        raise ValueError(f"unexpected correlation id {corr}")
    off = 4
    (n_brokers,) = struct.unpack_from(">i", data, off)
    off += 4
    brokers = []
    for _ in range(max(n_brokers, 0)):
        node_id, hlen = struct.unpack_from(">ih", data, off)
        off += 6
        bhost = data[off : off + hlen].decode()
        off += hlen
        (bport,) = struct.unpack_from(">i", data, off)
        off += 4
        brokers.append((node_id, bhost, bport))
    return brokers


def main(argv: list[str]) -> int:
    target = "127.0.0.1:9092"
    timeout = 2.0
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--timeout":
            timeout = float(args.pop(0))
        else:
            target = a
    host, _, port = target.rpartition(":")
    try:
        brokers = metadata_brokers(host or "127.0.0.1", int(port), timeout)
    except (OSError, ValueError, struct.error) as exc:
        print(f"kafka not ready at {target}: {exc}", file=sys.stderr)
        return 1
    if not brokers:
        print(f"kafka at {target} answered but lists no brokers yet", file=sys.stderr)
        return 1
    print(" ".join(f"{n}@{h}:{p}" for n, h, p in brokers))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
