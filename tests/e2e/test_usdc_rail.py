"""USDC on Base end to end: a worker with the payments agent and deposit screening on, the
custodian, TRM Labs and Chainalysis stood in by local HTTP servers (tests/standins), driven
through the HTTP API and signed custodian webhooks only.

Checked on the stand-ins' side: how many transfers the custodian made per settlement, where
the money went, and that no funds count as held before both screenings passed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from escrow_stream.config import Settings
from escrow_stream.web.auth import Role
from tests.e2e.test_http_reads import call, escrow_when, token
from tests.harness import Stack, WorkerProcess, deployment, eventually
from tests.standins.custodian import CustodianStandin, address_for, signed_headers
from tests.standins.risk import ChainalysisStandin, TrmStandin

pytestmark = pytest.mark.integration

AMOUNT = 25_000_000  # 25 USDC (6 decimals)
FEE = AMOUNT * 500 // 10_000  # ESCROW_FEE_BPS of the test deployments: 1.25 USDC
WAIT = {"Prefer": "wait=30"}


@dataclass
class Usdc:
    stack: Stack
    worker: WorkerProcess
    custodian: CustodianStandin
    trm: TrmStandin
    chainalysis: ChainalysisStandin


@pytest.fixture(scope="module")
def usdc(tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings) -> Iterator[Usdc]:
    run = uuid.uuid4().hex
    custodian = CustodianStandin(api_key=f"custodian-key-{run}", webhook_secret=f"cw-{run}")
    trm = TrmStandin(api_key=f"trm-key-{run}")
    chainalysis = ChainalysisStandin(api_key=f"ca-key-{run}")
    for standin in (custodian, trm, chainalysis):
        standin.start()
    try:
        with deployment(
            tmp_path_factory.mktemp("usdc"),
            PAYMENTS_EFFECTS_ENABLED="true",
            CUSTODIAN_API_URL=custodian.url,
            CUSTODIAN_API_KEY=custodian.api_key,
            CUSTODIAN_WEBHOOK_SECRET=custodian.webhook_secret,
            CUSTODIAN_MIN_CONFIRMATIONS="12",
            TRM_API_URL=trm.url,
            TRM_API_KEY=trm.api_key,
            CHAINALYSIS_API_URL=chainalysis.url,
            CHAINALYSIS_API_KEY=chainalysis.api_key,
            ESCROW_RETRY_DELAY_MS="50",
            ESCROW_MAX_RETRIES="1",
            PROVIDER_TIMEOUT_MS="2000",
        ) as (stack, worker):
            custodian.webhook_url = f"http://127.0.0.1:{worker.port}/api/webhooks/custodian"
            yield Usdc(stack, worker, custodian, trm, chainalysis)
    finally:
        for standin in (custodian, trm, chainalysis):
            standin.stop()


def parties() -> tuple[str, str, str]:
    run = uuid.uuid4().hex[:8]
    return f"ub-{run}", f"us-{run}", address_for(f"seller-wallet:{run}")


def usdc_escrow(u: Usdc, buyer: str, seller: str, wallet: str, **extra: str) -> dict[str, Any]:
    """The seller registers ``wallet`` as their payout account (screened, ACTIVE); the buyer
    creates over HTTP; wait for the custodian's deposit address on the escrow."""
    status, _, account = call(
        u.worker,
        "PUT",
        "/api/payout-accounts/usdc",
        token(u.stack, seller),
        {"walletAddress": wallet},
    )
    assert (status, account["status"]) == (200, "ACTIVE"), account
    body = {
        "offerId": "offer-usdc",
        "contractId": "contract-usdc",
        "rail": "USDC_BASE",
        "amount": str(AMOUNT),
        "currency": "USDC",
        "sellerId": seller,  # no payout field from a buyer: 422 (SPEC §10)
        **extra,
    }
    status, _, escrow = call(u.worker, "POST", "/api/escrow", token(u.stack, buyer), body, WAIT)
    assert status == 201, escrow
    instructed = escrow_when(
        u.stack, u.worker, buyer, escrow["escrowId"], lambda e: e.get("payment"), 60
    )
    assert instructed is not None, u.worker.log_tail()
    payment = instructed["payment"]
    assert payment["provider"] == "custodian"
    assert payment["depositAddress"] == address_for(f"deposit:{escrow['escrowId']}")
    return instructed


def status_is(wanted: str) -> Any:
    return lambda e: e["status"] == wanted


def funded(u: Usdc, buyer: str, escrow_id: str, sender: str) -> dict[str, Any]:
    code, answer = u.custodian.pay(escrow_id, AMOUNT, sender)
    assert code == 200 and answer["new"] is True, answer
    held = escrow_when(u.stack, u.worker, buyer, escrow_id, status_is("FUNDS_HELD"), 60)
    assert held is not None, u.worker.log_tail()
    return held


def act(
    u: Usdc, user: str, escrow_id: str, action: str, body: Any = None, role: Role = Role.USER
) -> None:
    status, _, answer = call(
        u.worker,
        "POST",
        f"/api/escrow/{escrow_id}/{action}",
        token(u.stack, user, role),
        body,
        WAIT,
    )
    assert status == 200, answer


async def fetch_deposit(u: Usdc, escrow_id: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(u.stack.settings.database_url.get_secret_value())
    try:
        return await conn.fetchrow(
            "SELECT * FROM custodian_deposits WHERE escrow_id = $1", escrow_id
        )
    finally:
        await conn.close()


def deposit_row(u: Usdc, escrow_id: str) -> asyncpg.Record | None:
    return asyncio.run(fetch_deposit(u, escrow_id))


def one_transfer(u: Usdc, escrow_id: str) -> dict[str, Any]:
    transfers = u.custodian.transfers_for(escrow_id)
    assert len(transfers) == 1, transfers
    return transfers[0]


def test_release_pays_the_seller_wallet_once(usdc: Usdc) -> None:
    u = usdc
    buyer, seller, wallet = parties()
    sender = address_for(f"buyer-wallet:{buyer}")
    escrow_id = usdc_escrow(u, buyer, seller, wallet)["escrowId"]
    held = funded(u, buyer, escrow_id, sender)
    assert held["payment"]["senderAddress"] == sender
    screened = [r for r in u.trm.requests + u.chainalysis.requests if sender in json.dumps(r)]
    assert screened, "funds held without screening"

    act(u, seller, escrow_id, "deliver", {})
    act(u, buyer, escrow_id, "release")
    released = escrow_when(u.stack, u.worker, buyer, escrow_id, status_is("RELEASED"), 60)
    assert released is not None, u.worker.log_tail()
    transfer = one_transfer(u, escrow_id)
    assert transfer["destination"]["address"] == wallet
    assert transfer["amount"] == str(AMOUNT - FEE)
    assert released["releasedAmount"] == str(AMOUNT)
    assert deposit_row(u, escrow_id)["status"] == "CLEARED"


def test_refund_returns_to_the_sender_once(usdc: Usdc) -> None:
    u = usdc
    buyer, seller, wallet = parties()
    sender = address_for(f"buyer-wallet:{buyer}")
    escrow_id = usdc_escrow(u, buyer, seller, wallet)["escrowId"]
    funded(u, buyer, escrow_id, sender)
    u.custodian.lose_next(1)  # the transfer is made, its answer lost: retried, same key
    act(u, seller, escrow_id, "refund", {"reason": "cannot deliver"})
    refunded = escrow_when(u.stack, u.worker, buyer, escrow_id, status_is("REFUNDED"), 60)
    assert refunded is not None, u.worker.log_tail()
    transfer = one_transfer(u, escrow_id)
    assert transfer["destination"]["address"] == sender
    assert transfer["amount"] == str(AMOUNT)
    outcomes = [r[3] for r in u.custodian.transfer_requests_for(escrow_id)]
    assert outcomes[0] == "lost" and "replayed" in outcomes, outcomes


def test_dispute_resolved_for_the_buyer_refunds_to_the_given_wallet(usdc: Usdc) -> None:
    u = usdc
    buyer, seller, wallet = parties()
    refund_to = address_for(f"refund-wallet:{buyer}")
    escrow_id = usdc_escrow(u, buyer, seller, wallet, buyerWalletAddress=refund_to)["escrowId"]
    funded(u, buyer, escrow_id, address_for(f"exchange:{buyer}"))
    act(u, seller, escrow_id, "deliver", {})
    act(u, buyer, escrow_id, "dispute", {"reason": "not as described"})
    u.custodian.fail_next(2)  # 500s: nothing made; retried
    act(
        u,
        f"admin-{buyer}",
        escrow_id,
        "dispute/resolve",
        {"resolution": "REFUND", "reason": "seller could not show delivery"},
        Role.ADMIN,
    )
    refunded = escrow_when(u.stack, u.worker, buyer, escrow_id, status_is("REFUNDED"), 60)
    assert refunded is not None, u.worker.log_tail()
    assert one_transfer(u, escrow_id)["destination"]["address"] == refund_to


def test_a_flagged_refund_wallet_is_never_paid(usdc: Usdc) -> None:
    u = usdc
    buyer, seller, wallet = parties()
    refund_to = address_for(f"flagged-refund-wallet:{buyer}")
    u.trm.flag(refund_to)  # the buyer's refund wallet; the deposit's sender is clean
    escrow_id = usdc_escrow(u, buyer, seller, wallet, buyerWalletAddress=refund_to)["escrowId"]
    funded(u, buyer, escrow_id, address_for(f"exchange:{buyer}"))
    act(u, seller, escrow_id, "refund", {"reason": "cannot deliver"})

    async def refused() -> list[dict[str, Any]]:
        events = await u.stack.events(lambda es: False, timeout_s=2)
        return [e for e in events if e["escrowId"] == escrow_id and e["type"] == "SettlementFailed"]

    failed = asyncio.run(eventually(refused, timeout_s=60))
    assert failed, u.worker.log_tail()
    assert failed[0]["data"]["errorCode"] == "destination_flagged"
    escrow = escrow_when(u.stack, u.worker, buyer, escrow_id, status_is("FUNDS_HELD"), 30)
    assert escrow is not None and escrow["settlement"] is None
    assert u.custodian.transfers_for(escrow_id) == []  # no money moved, no transfer asked


def test_sanctioned_sender_cancels_and_freezes(usdc: Usdc) -> None:
    u = usdc
    buyer, seller, wallet = parties()
    sender = address_for(f"sanctioned:{buyer}")
    u.trm.flag(sender)
    escrow_id = usdc_escrow(u, buyer, seller, wallet)["escrowId"]
    code, _ = u.custodian.pay(escrow_id, AMOUNT, sender)
    assert code == 200
    cancelled = escrow_when(u.stack, u.worker, buyer, escrow_id, status_is("CANCELLED"), 60)
    assert cancelled is not None, u.worker.log_tail()
    assert cancelled.get("cancellationReason") == "COMPLIANCE_REJECTED", cancelled
    assert cancelled["fundedAmount"] == "0"
    row = deposit_row(u, escrow_id)
    assert row["status"] == "FROZEN"
    screening = json.loads(row["screening"])  # jsonb as text: this connection has no codec
    assert screening["passed"] is False
    assert [p["provider"] for p in screening["providers"] if not p["passed"]] == ["trm"]
    frozen = unmatched_when(u, f"dpt_{escrow_id}", "FROZEN")
    assert frozen is not None and frozen["reason"] == "SENDER_FLAGGED"
    time.sleep(1)
    assert u.custodian.transfers_for(escrow_id) == []  # nothing sent back automatically


def test_screening_outage_never_holds_funds_unscreened(usdc: Usdc) -> None:
    u = usdc
    buyer, seller, wallet = parties()
    sender = address_for(f"buyer-wallet:{buyer}")
    escrow_id = usdc_escrow(u, buyer, seller, wallet)["escrowId"]
    u.chainalysis.fail_next(4)
    code, _ = u.custodian.pay(escrow_id, AMOUNT, sender)
    assert code == 200
    held = escrow_when(u.stack, u.worker, buyer, escrow_id, status_is("FUNDS_HELD"), 90)
    assert held is not None, u.worker.log_tail()
    row = deposit_row(u, escrow_id)
    assert row["status"] == "CLEARED" and row["attempts"] >= 2, dict(row)


def test_deposit_below_the_confirmations_is_not_counted(usdc: Usdc) -> None:
    u = usdc
    buyer, seller, wallet = parties()
    escrow_id = usdc_escrow(u, buyer, seller, wallet)["escrowId"]
    sender = address_for(f"buyer-wallet:{buyer}")
    code, answer = u.custodian.pay(escrow_id, AMOUNT, sender, confirmations=3)
    assert code == 200 and answer["ignored"] == "awaiting confirmations"
    assert deposit_row(u, escrow_id) is None
    funded(u, buyer, escrow_id, sender)  # the same deposit, now deep enough


async def fetch_unmatched(u: Usdc, deposit_id: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(u.stack.settings.database_url.get_secret_value())
    try:
        return await conn.fetchrow(
            "SELECT * FROM unmatched_funds"
            " WHERE provider = 'custodian' AND provider_object_id = $1",
            deposit_id,
        )
    finally:
        await conn.close()


def unmatched_when(u: Usdc, deposit_id: str, status: str) -> asyncpg.Record | None:
    async def reached() -> asyncpg.Record | None:
        row = await fetch_unmatched(u, deposit_id)
        return row if row is not None and row["status"] == status else None

    return asyncio.run(eventually(reached, 60))


def test_short_deposit_is_returned_and_the_exact_one_funds(usdc: Usdc) -> None:
    """SPEC §10: one deposit of exactly the amount funds a USDC escrow; a short one is refused
    AMOUNT_MISMATCH, recorded as unmatched funds and sent back to its sender, once."""
    u = usdc
    buyer, seller, wallet = parties()
    sender = address_for(f"buyer-wallet:{buyer}")
    escrow_id = usdc_escrow(u, buyer, seller, wallet)["escrowId"]
    short_id = f"dpt-short-{escrow_id}"
    code, _ = u.custodian.pay(escrow_id, AMOUNT - 1, sender, deposit_id=short_id)
    assert code == 200

    command_id = f"custodian:deposit:{short_id}"
    refused = asyncio.run(
        u.stack.rejections(lambda rs: any(r["commandId"] == command_id for r in rs))
    )
    mine = [r for r in refused if r["commandId"] == command_id]
    assert [r["code"] for r in mine][:1] == ["AMOUNT_MISMATCH"]
    assert mine[0]["payment"]["amount"] == str(AMOUNT - 1)
    returned = unmatched_when(u, short_id, "RETURNED")
    assert returned is not None, u.worker.log_tail()
    assert (returned["escrow_id"], returned["reason"]) == (escrow_id, "AMOUNT_MISMATCH")
    assert (returned["amount"], returned["sender_address"]) == (AMOUNT - 1, sender)
    back = [
        t for t in u.custodian.transfers_for(escrow_id) if t["reference"].startswith("unmatched:")
    ]
    assert len(back) == 1, back
    assert back[0]["destination"]["address"] == sender
    assert back[0]["amount"] == str(AMOUNT - 1)
    assert back[0]["reference"] == f"unmatched:custodian:{short_id}"
    assert returned["return_reference"] == back[0]["id"]
    status, _, escrow = call(u.worker, "GET", f"/api/escrow/{escrow_id}", token(u.stack, buyer))
    assert status == 200 and escrow["status"] == "AWAIT_FUNDS", escrow

    code, _ = u.custodian.pay(escrow_id, AMOUNT, sender, deposit_id=f"dpt-exact-{escrow_id}")
    assert code == 200
    held = escrow_when(u.stack, u.worker, buyer, escrow_id, status_is("FUNDS_HELD"), 60)
    assert held is not None, u.worker.log_tail()
    assert held["payment"]["fundedProviderPaymentId"] == f"dpt-exact-{escrow_id}"
    time.sleep(1)  # the held deposit is no unmatched money: nothing else went back
    assert len(u.custodian.transfers_for(escrow_id)) == 1


def test_a_second_deposit_after_funding_is_returned(usdc: Usdc) -> None:
    u = usdc
    buyer, seller, wallet = parties()
    sender = address_for(f"buyer-wallet:{buyer}")
    escrow_id = usdc_escrow(u, buyer, seller, wallet)["escrowId"]
    funded(u, buyer, escrow_id, sender)
    again = f"dpt-again-{escrow_id}"
    code, _ = u.custodian.pay(escrow_id, AMOUNT, sender, deposit_id=again)
    assert code == 200
    returned = unmatched_when(u, again, "RETURNED")
    assert returned is not None, u.worker.log_tail()
    assert returned["reason"] == "INVALID_TRANSITION"
    back = u.custodian.transfers_for(escrow_id)
    assert [(t["amount"], t["destination"]["address"]) for t in back] == [(str(AMOUNT), sender)]


def test_flagged_dust_freezes_itself_and_the_escrow_still_funds(usdc: Usdc) -> None:
    """Anyone who sees a deposit address can send it 1 base unit from a flagged wallet: that
    deposit is FROZEN (never moved, listed for compliance) and the escrow is not cancelled."""
    u = usdc
    buyer, seller, wallet = parties()
    griefer = address_for(f"griefer:{buyer}")
    u.trm.flag(griefer)
    escrow_id = usdc_escrow(u, buyer, seller, wallet)["escrowId"]
    dust = f"dpt-dust-{escrow_id}"
    code, _ = u.custodian.pay(escrow_id, 1, griefer, deposit_id=dust)
    assert code == 200
    frozen = unmatched_when(u, dust, "FROZEN")
    assert frozen is not None, u.worker.log_tail()
    assert (frozen["reason"], frozen["amount"], frozen["sender_address"]) == (
        "SENDER_FLAGGED",
        1,
        griefer,
    )
    command_id = f"custodian:compliance:{dust}"
    refused = asyncio.run(
        u.stack.rejections(lambda rs: any(r["commandId"] == command_id for r in rs))
    )
    assert [r["code"] for r in refused if r["commandId"] == command_id][:1] == ["AMOUNT_MISMATCH"]
    status, _, escrow = call(u.worker, "GET", f"/api/escrow/{escrow_id}", token(u.stack, buyer))
    assert status == 200 and escrow["status"] == "AWAIT_FUNDS", escrow

    sender = address_for(f"buyer-wallet:{buyer}")
    code, _ = u.custodian.pay(escrow_id, AMOUNT, sender, deposit_id=f"dpt-real-{escrow_id}")
    assert code == 200
    held = escrow_when(u.stack, u.worker, buyer, escrow_id, status_is("FUNDS_HELD"), 60)
    assert held is not None, u.worker.log_tail()
    assert u.custodian.transfers_for(escrow_id) == []  # the frozen dust never moves


# -- webhook attacks ----------------------------------------------------------------------


def post_raw(u: Usdc, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    response = httpx.post(str(u.custodian.webhook_url), content=body, headers=headers)
    return response.status_code, response.json()


def test_webhook_attacks_change_nothing(usdc: Usdc) -> None:
    u = usdc
    buyer, seller, wallet = parties()
    escrow_id = usdc_escrow(u, buyer, seller, wallet)["escrowId"]
    event = {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": "deposit.confirmed",
        "data": {
            "id": f"dpt_attack_{escrow_id}",
            "address": address_for(f"deposit:{escrow_id}"),
            "reference": escrow_id,
            "fromAddress": address_for("attacker"),
            "amount": str(AMOUNT),
            "asset": "USDC",
            "network": "base",
            "confirmations": 50,
        },
    }
    body = json.dumps(event).encode()
    secret = u.custodian.webhook_secret
    now = int(time.time())
    forged = signed_headers("not-the-secret", body, now)
    stale = signed_headers(secret, body, now - 400)  # margins: the worker reads its clock later
    future = signed_headers(secret, body, now + 400)
    tampered_body = body.replace(b'"50"', b'"51"').replace(str(AMOUNT).encode(), b"1")
    tampered = signed_headers(secret, body, now)
    missing = {"Content-Type": "application/json"}
    for headers, payload in (
        (forged, body),
        (stale, body),
        (future, body),
        (tampered, tampered_body),
        (missing, body),
    ):
        status, answer = post_raw(u, payload, headers)
        assert status == 400 and answer["code"] == "INVALID_SIGNATURE", answer
    assert deposit_row(u, escrow_id) is None

    # the genuine event five times (and once more under a new event id): one deposit
    answers = [post_raw(u, body, signed_headers(secret, body)) for _ in range(5)]
    again = dict(event, id=f"evt_{uuid.uuid4().hex}")
    again_body = json.dumps(again).encode()
    answers.append(post_raw(u, again_body, signed_headers(secret, again_body)))
    assert all(status == 200 for status, _ in answers), answers
    assert [a["new"] for _, a in answers] == [True, False, False, False, False, False]
    assert escrow_when(u.stack, u.worker, buyer, escrow_id, status_is("FUNDS_HELD"), 60)


def test_transfer_events_out_of_order_and_repeated(usdc: Usdc) -> None:
    u = usdc
    buyer, seller, wallet = parties()
    escrow_id = usdc_escrow(u, buyer, seller, wallet)["escrowId"]
    key = f"escrow-release:{escrow_id}:all:1"
    completed = {
        "id": "tx_early",
        "status": "COMPLETED",
        "reference": key,
        "amount": str(AMOUNT - FEE),
        "metadata": {"escrow_id": escrow_id, "settlement_key": key},
    }
    # transfer.completed before any settlement was asked for: refused by the escrow's rules
    event_id = f"evt_{uuid.uuid4().hex}"
    for _ in range(5):
        status, answer = u.custodian.send_webhook("transfer.completed", completed, event_id)
        assert status == 200, answer
    command_id = f"custodian:{event_id}"
    refused = asyncio.run(
        u.stack.rejections(lambda rs: any(r["commandId"] == command_id for r in rs))
    )
    assert {r["type"] for r in refused if r["commandId"] == command_id} == {"ConfirmSettlement"}
    escrow = escrow_when(u.stack, u.worker, buyer, escrow_id, status_is("AWAIT_FUNDS"), 10)
    assert escrow is not None and escrow["releasedAmount"] == "0"

    funded(u, buyer, escrow_id, address_for(f"buyer-wallet:{buyer}"))
    act(u, seller, escrow_id, "deliver", {})
    act(u, buyer, escrow_id, "release")
    released = escrow_when(u.stack, u.worker, buyer, escrow_id, status_is("RELEASED"), 60)
    assert released is not None, u.worker.log_tail()
    transfer = one_transfer(u, escrow_id)
    for _ in range(5):  # the custodian repeating its completion changes nothing
        status, _ = u.custodian.send_webhook(
            "transfer.completed", {**transfer, "status": "COMPLETED"}
        )
        assert status == 200
    events = asyncio.run(u.stack.events(lambda es: False, timeout_s=3))
    mine = [e for e in events if e["escrowId"] == escrow_id and e["type"] == "EscrowReleased"]
    assert len({e["eventId"] for e in mine}) == 1
    assert mine[0]["data"]["providerReference"] == transfer["id"]
