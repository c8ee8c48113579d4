"""What every rail shares: the settlement a rail performs and the error that ends one."""

from __future__ import annotations

from escrow_stream.domain.escrow import Escrow, Settlement


class PermanentSettlementError(Exception):
    """The provider refused the settlement (or the payment instructions) for a reason a
    retry will not change."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def pending_settlement(escrow: Escrow) -> Settlement:
    """The settlement a rail is asked to perform; its ``settlement_id`` is the provider's
    idempotency key (one per settlement attempt and milestone, so a retry never moves money
    twice)."""
    if escrow.settlement is None:
        raise PermanentSettlementError(
            "no_pending_settlement", f"escrow {escrow.escrow_id} has no settlement to perform"
        )
    return escrow.settlement


def settled_command_id(key: str) -> str:
    """The commandId confirming one settlement, whoever confirms it (agent or webhook)."""
    return f"payments:settled:{key}"


def failed_command_id(key: str) -> str:
    """The commandId recording that one settlement failed."""
    return f"payments:failed:{key}"
