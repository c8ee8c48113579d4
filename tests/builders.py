"""Building commands for the tests: wire-format command envelopes as producers put them on
``escrow-commands``, and the payout destinations test sellers get.  (Typed domain commands
for the pure unit tests, with the independent model of SPEC §2, are in
``tests/unit/domain_support.py``.)"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

#: The ACTIVE payout destinations test sellers get (``harness.activate_payouts``).
TEST_PAYOUTS = {"STRIPE": "acct_test_seller", "USDC_BASE": "0x" + "5e" * 20}


def wire_command(
    type_: str,
    escrow_id: str,
    actor: dict[str, str],
    payload: dict[str, Any] | None = None,
    command_id: str | None = None,
) -> dict[str, Any]:
    return {
        "schemaVersion": 1,
        "commandId": command_id or f"cmd-{uuid.uuid4().hex}",
        "type": type_,
        "escrowId": escrow_id,
        "actor": actor,
        "payload": payload or {},
        "issuedAt": datetime.now(UTC).isoformat(),
    }
