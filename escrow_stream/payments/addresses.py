"""EVM addresses: ``0x`` + 40 hex digits, and the EIP-55 mixed-case checksum (Keccak-256).

EIP-55: hash the lower-case hex digits (ASCII, without ``0x``) with Keccak-256, the original
Keccak padding (``0x01``), not NIST SHA3's (``0x06``), so ``hashlib.sha3_256`` does not do;
a letter is upper case exactly when the hash's nibble at its position is 8 or more.  An
address all in one case carries no checksum and is accepted as written.
"""

from __future__ import annotations

from escrow_stream.payments.custodian import is_address

_MASK = (1 << 64) - 1
_RATE_BYTES = 136  # Keccak-256: capacity 512 bits
_ROUND_CONSTANTS = (
    0x0000000000000001, 0x0000000000008082, 0x800000000000808A, 0x8000000080008000,
    0x000000000000808B, 0x0000000080000001, 0x8000000080008081, 0x8000000000008009,
    0x000000000000008A, 0x0000000000000088, 0x0000000080008009, 0x000000008000000A,
    0x000000008000808B, 0x800000000000008B, 0x8000000000008089, 0x8000000000008003,
    0x8000000000008002, 0x8000000000000080, 0x000000000000800A, 0x800000008000000A,
    0x8000000080008081, 0x8000000000008080, 0x0000000080000001, 0x8000000080008008,
)  # fmt: skip
#: Rotation offsets r[x][y].
_ROTATIONS = (
    (0, 36, 3, 41, 18),
    (1, 44, 10, 45, 2),
    (62, 6, 43, 15, 61),
    (28, 55, 25, 21, 56),
    (27, 20, 39, 8, 14),
)


def _rotl(lane: int, n: int) -> int:
    return ((lane << n) | (lane >> (64 - n))) & _MASK if n else lane


def _keccak_f(a: list[list[int]]) -> None:
    """The Keccak-f[1600] permutation on lanes ``a[x][y]``, in place."""
    for rc in _ROUND_CONSTANTS:
        c = [a[x][0] ^ a[x][1] ^ a[x][2] ^ a[x][3] ^ a[x][4] for x in range(5)]
        d = [c[(x - 1) % 5] ^ _rotl(c[(x + 1) % 5], 1) for x in range(5)]
        for x in range(5):
            for y in range(5):
                a[x][y] ^= d[x]
        b = [[0] * 5 for _ in range(5)]
        for x in range(5):
            for y in range(5):
                b[y][(2 * x + 3 * y) % 5] = _rotl(a[x][y], _ROTATIONS[x][y])
        for x in range(5):
            for y in range(5):
                a[x][y] = b[x][y] ^ (~b[(x + 1) % 5][y] & b[(x + 2) % 5][y] & _MASK)
        a[0][0] ^= rc


def keccak256(data: bytes) -> bytes:
    """Keccak-256 as Ethereum uses it."""
    padded = bytearray(data)
    padded.append(0x01)
    padded.extend(b"\0" * (-len(padded) % _RATE_BYTES))
    padded[-1] |= 0x80
    a = [[0] * 5 for _ in range(5)]
    for start in range(0, len(padded), _RATE_BYTES):
        block = padded[start : start + _RATE_BYTES]
        for i in range(_RATE_BYTES // 8):
            a[i % 5][i // 5] ^= int.from_bytes(block[8 * i : 8 * i + 8], "little")
        _keccak_f(a)
    out = b"".join(a[i % 5][i // 5].to_bytes(8, "little") for i in range(4))
    return out


def checksummed(address: str) -> str:
    """The EIP-55 spelling of a syntactically valid address."""
    digits = address[2:].lower()
    nibbles = keccak256(digits.encode()).hex()
    return "0x" + "".join(
        ch.upper() if ch.isalpha() and int(nibbles[i], 16) >= 8 else ch
        for i, ch in enumerate(digits)
    )


def address_problem(value: object) -> str | None:
    """Why ``value`` is not an acceptable EVM address, or None when it is."""
    if not is_address(value):
        return "must be 0x followed by 40 hexadecimal digits"
    assert isinstance(value, str)
    digits = value[2:]
    if digits != digits.lower() and digits != digits.upper() and checksummed(value) != value:
        return "mixed-case address with a wrong EIP-55 checksum"
    return None
