"""What every rail shares: settlement identity and the error that ends a settlement."""

from __future__ import annotations

from typing import Any

from escrow_stream.domain.escrow import SettlementKind, settlement_id_for


class PermanentSettlementError(Exception):
    """The provider refused the settlement (or the payment instructions) for a reason a
    retry will not change."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def settlement_key(escrow_id: str, settlement: dict[str, Any]) -> str:
    """The settlement's id (``domain.escrow.settlement_id_for``), used as the provider's
    idempotency key: one key per settlement attempt (and milestone), so a retry never moves
    money twice.  ``settlement`` is the snapshot's settlement or SettlementRequested data."""
    return settlement_id_for(
        escrow_id,
        SettlementKind(settlement["kind"]),
        settlement.get("milestoneId"),
        int(settlement["attempt"]),
    )


def settled_command_id(key: str) -> str:
    """The commandId confirming one settlement, whoever confirms it (agent or webhook)."""
    return f"payments:settled:{key}"


def failed_command_id(key: str) -> str:
    """The commandId recording that one settlement failed."""
    return f"payments:failed:{key}"
