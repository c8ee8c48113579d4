"""What every rail shares: settlement identity and the error that ends a settlement."""

from __future__ import annotations

from typing import Any


class PermanentSettlementError(Exception):
    """The provider refused the settlement for a reason a retry will not change."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def settlement_key(escrow_id: str, settlement: dict[str, Any]) -> str:
    """One key per settlement attempt (and milestone): a retry never moves money twice."""
    milestone = settlement.get("milestoneId") or "all"
    return f"escrow-{settlement['kind'].lower()}:{escrow_id}:{milestone}:{settlement['attempt']}"


def settled_command_id(key: str) -> str:
    """The commandId confirming one settlement, whoever confirms it (agent or webhook)."""
    return f"payments:settled:{key}"


def failed_command_id(key: str) -> str:
    """The commandId recording that one settlement failed."""
    return f"payments:failed:{key}"
