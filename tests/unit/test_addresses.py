"""EVM payout addresses: syntax, Keccak-256 and the EIP-55 checksum (the EIP's own vectors)."""

from __future__ import annotations

import pytest

from escrow_stream.payments.addresses import address_problem, checksummed, keccak256

EIP55_VECTORS = (
    "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
    "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
    "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
    "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
)


def test_keccak256_is_ethereums_not_nist_sha3() -> None:
    empty = "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert keccak256(b"").hex() == empty
    # more than one 136-byte block
    assert keccak256(b"a" * 200).hex() == (
        "96ea54061def936c4be90b518992fdc6f12f535068a256229aca54267b4d084d"
    )


@pytest.mark.parametrize("address", EIP55_VECTORS)
def test_checksummed_addresses_pass_and_a_flipped_letter_fails(address: str) -> None:
    assert checksummed(address.lower()) == address
    assert address_problem(address) is None
    assert address_problem(address.lower()) is None  # one case: no checksum to check
    assert address_problem("0x" + address[2:].upper()) is None
    i = next(i for i, ch in enumerate(address) if i > 1 and ch.isalpha())
    flipped = address[:i] + address[i].swapcase() + address[i + 1 :]
    assert address_problem(flipped) == "mixed-case address with a wrong EIP-55 checksum"


@pytest.mark.parametrize("bad", ["", "0x", "0x123", "5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", 7])
def test_malformed_addresses_are_refused(bad: object) -> None:
    assert address_problem(bad) == "must be 0x followed by 40 hexadecimal digits"
