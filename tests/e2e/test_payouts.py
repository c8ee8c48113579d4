"""Payout accounts end to end (SPEC §10): a release pays only the seller's ACTIVE account.

One worker with the payments agent on and KYC gating on (the seed's default; parties are
verified through ``PUT /api/kyc/{userId}``), Stripe behind the fault proxy in front of
stripe-mock, the custodian, TRM Labs and Chainalysis stood in by local servers.  Driven over
HTTP and signed webhooks; what moved is counted on the providers' side.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from escrow_stream.config import Settings
from escrow_stream.db.queries import reconcile, stuck_escrows
from escrow_stream.messages import make_command
from escrow_stream.web.auth import Role
from tests.e2e.test_http_reads import call, escrow_when, token
from tests.e2e.test_webhooks_stripe import deliver, sign
from tests.harness import Stack, WorkerProcess, activate_payouts, deployment, eventually
from tests.standins.custodian import CustodianStandin, address_for
from tests.standins.risk import ChainalysisStandin, TrmStandin
from tests.standins.stripe_proxy import StripeProxy

pytestmark = pytest.mark.integration

WAIT = {"Prefer": "wait=30"}
USD_AMOUNT, USDC_AMOUNT = 10_000, 25_000_000
SETTLED_WAIT_S = 60.0


@dataclass
class World:
    stack: Stack
    worker: WorkerProcess
    proxy: StripeProxy
    custodian: CustodianStandin
    trm: TrmStandin
    chainalysis: ChainalysisStandin


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, stack_settings: Settings) -> Iterator[World]:
    run = uuid.uuid4().hex
    proxy = StripeProxy()
    custodian = CustodianStandin(api_key=f"custodian-key-{run}", webhook_secret=f"cw-{run}")
    trm = TrmStandin(api_key=f"trm-key-{run}")
    chainalysis = ChainalysisStandin(api_key=f"ca-key-{run}")
    standins = (proxy, custodian, trm, chainalysis)
    for standin in standins:
        standin.start()
    try:
        with deployment(
            tmp_path_factory.mktemp("payouts"),
            FEATURE_KYC_GATING="true",
            PAYMENTS_EFFECTS_ENABLED="true",
            STRIPE_API_BASE=proxy.url,
            STRIPE_WEBHOOK_SECRET=f"whsec_test_{run}",
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
            yield World(stack, worker, proxy, custodian, trm, chainalysis)
    finally:
        for standin in standins:
            standin.stop()


# -- helpers ------------------------------------------------------------------------------


def parties(w: World, verified: bool = True) -> tuple[str, str]:
    run = uuid.uuid4().hex[:8]
    buyer, seller = f"pb-{run}", f"ps-{run}"
    if verified:
        for user in (buyer, seller):
            kyc(w, user, "VERIFIED")
    return buyer, seller


def kyc(w: World, user: str, status: str) -> None:
    admin = token(w.stack, "ops", Role.ADMIN)
    assert call(w.worker, "PUT", f"/api/kyc/{user}", admin, {"status": status})[0] == 200


def act(w: World, user: str, escrow_id: str, action: str, body: Any = None, role: Role = Role.USER):
    return call(
        w.worker,
        "POST",
        f"/api/escrow/{escrow_id}/{action}",
        token(w.stack, user, role),
        body,
        WAIT,
    )


def status_is(wanted: str) -> Any:
    return lambda e: e["status"] == wanted


def stripe_secret(w: World) -> str:
    return w.stack.settings.stripe_webhook_secret.get_secret_value()


def stripe_event(
    w: World, kind: str, obj: dict[str, Any], created: int | None = None
) -> tuple[int, dict[str, Any]]:
    body = json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "object": "event",
            "type": kind,
            "created": created or int(time.time()),
            "data": {"object": obj},
        }
    ).encode()
    return deliver(w.worker, body, sign(stripe_secret(w), body, int(time.time())))


def onboard_stripe(w: World, seller: str, activate: bool = True) -> str:
    """The seller's own onboarding, then Stripe's ``account.updated``; the account id."""
    status, _, account = call(
        w.worker, "POST", "/api/payout-accounts/stripe", token(w.stack, seller)
    )
    assert status == 201, account
    assert (account["rail"], account["status"]) == ("STRIPE", "PENDING")
    assert account["accountId"].startswith("acct_") and account["onboardingUrl"].startswith("http")
    if activate:
        answer = stripe_event(
            w,
            "account.updated",
            {
                "id": account["accountId"],
                "object": "account",
                "payouts_enabled": True,
                "charges_enabled": True,
            },
        )
        assert answer[0] == 200, answer
    return str(account["accountId"])


def my_accounts(w: World, user: str) -> dict[str, dict[str, Any]]:
    status, _, body = call(w.worker, "GET", "/api/payout-accounts/me", token(w.stack, user))
    assert status == 200, body
    return {a["rail"]: a for a in body["accounts"]}


def usd_escrow(w: World, buyer: str, seller: str, **extra: Any) -> str:
    """Created over HTTP by the buyer (no payout field), paid through Stripe's webhook."""
    body = {
        "offerId": "offer-p",
        "contractId": "contract-p",
        "rail": "STRIPE",
        "amount": str(USD_AMOUNT),
        "currency": "USD",
        "sellerId": seller,
        **extra,
    }
    status, _, escrow = call(w.worker, "POST", "/api/escrow", token(w.stack, buyer), body, WAIT)
    assert status == 201, escrow
    escrow_id = str(escrow["escrowId"])
    instructed = escrow_when(w.stack, w.worker, buyer, escrow_id, lambda e: e.get("payment"), 60)
    assert instructed is not None, w.worker.log_tail()
    intent = instructed["payment"]["providerPaymentId"]
    paid = stripe_event(
        w,
        "payment_intent.succeeded",
        {
            "id": intent,
            "object": "payment_intent",
            "amount": USD_AMOUNT,
            "amount_received": USD_AMOUNT,
            "currency": "usd",
            "metadata": {"escrow_id": escrow_id},
        },
    )
    assert paid[0] == 200, paid
    assert escrow_when(w.stack, w.worker, buyer, escrow_id, status_is("FUNDS_HELD"), 60)
    return escrow_id


def settlement_requests(w: World, escrow_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The escrow's SettlementRequested events, once there are ``count`` of them."""

    def mine(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            e for e in events if e["escrowId"] == escrow_id and e["type"] == "SettlementRequested"
        ]

    return mine(asyncio.run(w.stack.events(lambda es: len(mine(es)) >= count)))


def transfers_to(w: World, escrow_id: str) -> list[str]:
    """The destinations of the Transfers Stripe created for this escrow (one per key)."""
    keys = w.proxy.created_keys("/v1/transfers", escrow_id)
    answers = [w.proxy.stored_answer(k) for k in sorted(keys)]
    return [json.loads(a)["destination"] for a in answers if a is not None]


def ledger_balanced(w: World, escrow_id: str) -> bool:
    """Once the mirror has the settled escrow: ``reconcile`` finds nothing wrong with it."""

    async def problems() -> tuple[list[str]] | None:
        pool = await asyncpg.create_pool(
            w.stack.settings.database_url.get_secret_value(), min_size=1, max_size=1
        )
        try:
            settled = await pool.fetchval("SELECT status FROM escrows WHERE id = $1", escrow_id)
            if settled not in ("RELEASED", "REFUNDED"):
                return None  # the mirror trails the table
            return (await reconcile(pool, [escrow_id]),)  # a tuple: truthy when clean
        finally:
            await pool.close()

    found = asyncio.run(eventually(problems, timeout_s=30))
    assert found == ([],), found
    return True


# -- Stripe -------------------------------------------------------------------------------


def test_usd_release_pays_the_onboarded_sellers_connect_account_once(world: World) -> None:
    w = world
    buyer, seller = parties(w)
    account_id = onboard_stripe(w, seller)
    assert my_accounts(w, seller)["STRIPE"]["status"] == "ACTIVE"
    again = call(w.worker, "POST", "/api/payout-accounts/stripe", token(w.stack, seller))
    assert (again[0], again[2]["accountId"], again[2]["status"]) == (201, account_id, "ACTIVE")

    escrow_id = usd_escrow(w, buyer, seller)
    assert act(w, seller, escrow_id, "deliver", {})[0] == 200
    status, _, body = act(w, buyer, escrow_id, "release")
    assert status == 200, body
    requested = settlement_requests(w, escrow_id)
    assert [r["data"]["destination"] for r in requested] == [
        {"type": "stripe_account", "accountId": account_id}
    ]
    released = escrow_when(w.stack, w.worker, buyer, escrow_id, status_is("RELEASED"), 60)
    assert released is not None, w.worker.log_tail()
    assert released["releasedAmount"] == str(USD_AMOUNT)
    assert transfers_to(w, escrow_id) == [account_id]
    assert ledger_balanced(w, escrow_id)


def test_release_without_a_payout_account_waits_until_the_seller_onboards(world: World) -> None:
    w = world
    buyer, seller = parties(w)
    escrow_id = usd_escrow(w, buyer, seller)
    assert act(w, seller, escrow_id, "deliver", {})[0] == 200
    status, _, body = act(w, buyer, escrow_id, "release")
    assert status == 200, body
    assert body["settlement"]["status"] == "AWAITING_PAYOUT_ACCOUNT"
    assert body["settlement"].get("destination") is None

    # the timeout processor's refund, as it would send it: refused, nothing changes
    timeout = make_command(
        {"id": "timeout-processor", "role": "system"},
        "RefundEscrow",
        escrow_id,
        {"reason": "TIMEOUT"},
        f"timeout:{escrow_id}:DELIVERED:{body['version']}",
        datetime.now(UTC),
    )
    asyncio.run(w.stack.send([json.loads(timeout.model_dump_json(by_alias=True))]))
    refused = asyncio.run(
        w.stack.rejections(lambda rs: any(r["commandId"] == timeout.command_id for r in rs))
    )
    assert [r["code"] for r in refused if r["commandId"] == timeout.command_id] == [
        "SETTLEMENT_PENDING"
    ]

    async def listed() -> bool:
        pool = await asyncpg.create_pool(w.stack.settings.database_url.get_secret_value())
        try:
            rows = await stuck_escrows(pool, datetime.now(UTC), [escrow_id])
        finally:
            await pool.close()
        return [r["waiting_for"] for r in rows] == ["payout_account"]

    assert asyncio.run(eventually(listed, timeout_s=30))

    def gauge() -> bool:
        text = call(w.worker, "GET", "/metrics")[2]
        line = next(
            (x for x in text.splitlines() if x.startswith("escrow_settlements_awaiting_payout")),
            "",
        )
        return bool(line) and float(line.split()[-1]) >= 1

    assert asyncio.run(eventually(gauge, timeout_s=30))
    time.sleep(3)  # a few payout sweeps: nothing pays without an account
    assert w.proxy.created_keys("/v1/transfers", escrow_id) == set()
    waiting = escrow_when(w.stack, w.worker, buyer, escrow_id, status_is("DELIVERED"), 5)
    assert waiting is not None and waiting["settlement"]["status"] == "AWAITING_PAYOUT_ACCOUNT"

    account_id = onboard_stripe(w, seller, activate=False)
    time.sleep(3)  # onboarding started is not onboarding done
    assert w.proxy.created_keys("/v1/transfers", escrow_id) == set()
    answer = stripe_event(
        w, "account.updated", {"id": account_id, "object": "account", "payouts_enabled": True}
    )
    assert answer[0] == 200, answer
    released = escrow_when(w.stack, w.worker, buyer, escrow_id, status_is("RELEASED"), 60)
    assert released is not None, w.worker.log_tail()
    assert transfers_to(w, escrow_id) == [account_id]
    assert ledger_balanced(w, escrow_id)
    # the same settlement, requested again once the account was ACTIVE
    requested = settlement_requests(w, escrow_id, 2)
    assert [r["data"]["status"] for r in requested] == ["AWAITING_PAYOUT_ACCOUNT", "PENDING"]
    assert len({r["escrow"]["settlement"]["settlementId"] for r in requested}) == 1
    assert requested[1]["causationId"].startswith("payout-resume:")


def test_the_sweep_resumes_a_release_whose_activation_missed_it(world: World) -> None:
    """An account that became ACTIVE without its activation finding the waiting release
    (the mirror trailed): the workers' sweep resumes it within seconds."""
    w = world
    buyer, seller = parties(w)
    escrow_id = usd_escrow(w, buyer, seller)
    assert act(w, seller, escrow_id, "deliver", {})[0] == 200
    status, _, body = act(w, buyer, escrow_id, "release")
    assert (status, body["settlement"]["status"]) == (200, "AWAITING_PAYOUT_ACCOUNT")
    account_id = f"acct_sweep{uuid.uuid4().hex[:10]}"
    asyncio.run(activate_payouts(w.stack.settings, seller, {"STRIPE": account_id}))
    released = escrow_when(w.stack, w.worker, buyer, escrow_id, status_is("RELEASED"), 60)
    assert released is not None, w.worker.log_tail()
    assert transfers_to(w, escrow_id) == [account_id]


def test_an_admin_refunds_a_release_whose_seller_never_onboards(world: World) -> None:
    w = world
    buyer, seller = parties(w)
    escrow_id = usd_escrow(w, buyer, seller)
    assert act(w, seller, escrow_id, "deliver", {})[0] == 200
    status, _, body = act(w, buyer, escrow_id, "release")
    assert (status, body["settlement"]["status"]) == (200, "AWAITING_PAYOUT_ACCOUNT")
    refund = {"reason": "seller never set up payouts"}
    status, _, problem = act(w, seller, escrow_id, "refund", refund)
    assert (status, problem["code"]) == (409, "SETTLEMENT_PENDING")
    status, _, body = act(w, "ops", escrow_id, "refund", refund, Role.ADMIN)
    assert status == 200, body
    refunded = escrow_when(w.stack, w.worker, buyer, escrow_id, status_is("REFUNDED"), 60)
    assert refunded is not None, w.worker.log_tail()
    assert w.proxy.created_keys("/v1/transfers", escrow_id) == set()
    assert len(w.proxy.created_keys("/v1/refunds", escrow_id)) == 1
    assert ledger_balanced(w, escrow_id)


# -- USDC ---------------------------------------------------------------------------------


def register_wallet(w: World, seller: str, wallet: str) -> tuple[int, dict[str, Any]]:
    status, _, body = call(
        w.worker,
        "PUT",
        "/api/payout-accounts/usdc",
        token(w.stack, seller),
        {"walletAddress": wallet},
    )
    return status, body


def usdc_escrow(w: World, buyer: str, seller: str) -> str:
    body = {
        "offerId": "offer-u",
        "contractId": "contract-u",
        "rail": "USDC_BASE",
        "amount": str(USDC_AMOUNT),
        "currency": "USDC",
        "sellerId": seller,
    }
    status, _, escrow = call(w.worker, "POST", "/api/escrow", token(w.stack, buyer), body, WAIT)
    assert status == 201, escrow
    escrow_id = str(escrow["escrowId"])
    assert escrow_when(w.stack, w.worker, buyer, escrow_id, lambda e: e.get("payment"), 60)
    code, answer = w.custodian.pay(escrow_id, USDC_AMOUNT, address_for(f"buyer:{buyer}"))
    assert code == 200, answer
    assert escrow_when(w.stack, w.worker, buyer, escrow_id, status_is("FUNDS_HELD"), 60)
    return escrow_id


def test_usdc_release_pays_the_registered_wallet_once(world: World) -> None:
    w = world
    buyer, seller = parties(w)
    wallet = address_for(f"payout:{seller}")
    status, account = register_wallet(w, seller, wallet)
    assert (status, account["status"], account["walletAddress"]) == (200, "ACTIVE", wallet)
    assert any(wallet in json.dumps(r) for r in w.trm.requests)
    assert any(wallet in json.dumps(r) for r in w.chainalysis.requests)

    escrow_id = usdc_escrow(w, buyer, seller)
    assert act(w, seller, escrow_id, "deliver", {})[0] == 200
    assert act(w, buyer, escrow_id, "release")[0] == 200
    released = escrow_when(w.stack, w.worker, buyer, escrow_id, status_is("RELEASED"), 60)
    assert released is not None, w.worker.log_tail()
    transfers = w.custodian.transfers_for(escrow_id)
    assert [t["destination"]["address"] for t in transfers] == [wallet]
    assert ledger_balanced(w, escrow_id)


def test_a_flagged_wallet_is_rejected_and_never_paid_a_clean_one_resumes(world: World) -> None:
    w = world
    buyer, seller = parties(w)
    wallet = address_for(f"flagged:{seller}")
    w.trm.flag(wallet)
    status, account = register_wallet(w, seller, wallet)
    assert (status, account["status"]) == (200, "REJECTED"), account
    assert account["screening"]["passed"] is False

    escrow_id = usdc_escrow(w, buyer, seller)
    assert act(w, seller, escrow_id, "deliver", {})[0] == 200
    status, _, body = act(w, buyer, escrow_id, "release")
    assert (status, body["settlement"]["status"]) == (200, "AWAITING_PAYOUT_ACCOUNT")
    time.sleep(3)
    assert w.custodian.transfers_for(escrow_id) == []

    # a clean wallet, registered by a service this time: screened ACTIVE, the release resumes
    clean = address_for(f"clean:{seller}")
    service = token(w.stack, "marketplace", Role.SERVICE)
    status, _, account = call(
        w.worker,
        "PUT",
        f"/api/payout-accounts/{seller}",
        service,
        {"rail": "USDC_BASE", "walletAddress": clean},
    )
    assert (status, account["status"]) == (200, "ACTIVE"), account
    released = escrow_when(w.stack, w.worker, buyer, escrow_id, status_is("RELEASED"), 60)
    assert released is not None, w.worker.log_tail()
    assert [t["destination"]["address"] for t in w.custodian.transfers_for(escrow_id)] == [clean]


def test_wallet_screening_outage_leaves_it_pending_then_screened_again(world: World) -> None:
    w = world
    _, seller = parties(w)
    wallet = address_for(f"outage:{seller}")
    w.chainalysis.fail_next(4)  # more than the client's retries: no answer this time
    status, account = register_wallet(w, seller, wallet)
    assert (status, account["status"]) == (202, "PENDING"), account

    def active() -> bool:
        return my_accounts(w, seller).get("USDC_BASE", {}).get("status") == "ACTIVE"

    assert asyncio.run(eventually(active, timeout_s=60)), w.worker.log_tail()


def test_payout_bodies_are_checked(world: World) -> None:
    w = world
    _, seller = parties(w, verified=False)
    for bad in ("0x123", "0x" + "g" * 40, "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD"):
        status, problem = register_wallet(w, seller, bad)
        assert (status, problem["code"]) == (422, "VALIDATION_FAILED"), (bad, problem)
    good = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"  # EIP-55 checksummed
    assert register_wallet(w, seller, good)[0] == 200
    admin = token(w.stack, "ops", Role.ADMIN)
    path = f"/api/payout-accounts/{seller}"
    mixed = {"rail": "STRIPE", "walletAddress": good}
    assert call(w.worker, "PUT", path, admin, mixed)[0] == 422
    assert call(w.worker, "PUT", path, token(w.stack, seller), {"rail": "STRIPE"})[0] == 403
    account_id = f"acct_{uuid.uuid4().hex[:12]}"
    status, _, body = call(
        w.worker, "PUT", path, admin, {"rail": "STRIPE", "accountId": account_id}
    )
    assert (status, body["status"]) == (200, "PENDING"), body  # Stripe: payouts not enabled

    def stripe_status() -> str:
        return str(my_accounts(w, seller)["STRIPE"]["status"])

    now = int(time.time())
    account = {"id": account_id, "object": "account"}
    assert stripe_event(w, "account.updated", {**account, "payouts_enabled": True}, now)[0] == 200
    assert stripe_status() == "ACTIVE"
    older = {**account, "payouts_enabled": False}
    assert stripe_event(w, "account.updated", older, now - 60)[0] == 200
    assert stripe_status() == "ACTIVE"  # Stripe delivers out of order: an older word loses
    assert stripe_event(w, "account.updated", older, now + 1)[0] == 200
    assert stripe_status() == "PENDING"  # payouts disabled again: nothing pays it
    status, _, body = call(w.worker, "GET", path, admin)
    assert status == 200 and {a["rail"] for a in body["accounts"]} == {"STRIPE", "USDC_BASE"}


# -- KYC on every release path ----------------------------------------------------------------


def test_milestone_release_needs_both_parties_verified(world: World) -> None:
    w = world
    buyer, seller = parties(w)
    account_id = onboard_stripe(w, seller)
    milestones = [
        {"milestoneId": "m1", "title": "design", "amount": "6000"},
        {"milestoneId": "m2", "title": "build", "amount": "4000"},
    ]
    escrow_id = usd_escrow(w, buyer, seller, milestones=milestones)
    assert act(w, seller, escrow_id, "milestones/m1/deliver")[0] == 200

    kyc(w, buyer, "PENDING")
    status, _, problem = act(w, buyer, escrow_id, "milestones/m1/release")
    assert (status, problem["code"]) == (403, "KYC_REQUIRED"), problem
    # the stream refuses it too (a producer that skips the gateway)
    command = make_command(
        {"id": buyer, "role": "user"},
        "ReleaseMilestone",
        escrow_id,
        {"milestoneId": "m1"},
        f"kyc-{uuid.uuid4().hex}",
        datetime.now(UTC),
    )
    asyncio.run(w.stack.send([json.loads(command.model_dump_json(by_alias=True))]))
    refused = asyncio.run(
        w.stack.rejections(lambda rs: any(r["commandId"] == command.command_id for r in rs))
    )
    assert [r["code"] for r in refused if r["commandId"] == command.command_id] == ["KYC_REQUIRED"]

    kyc(w, buyer, "VERIFIED")
    status, _, body = act(w, buyer, escrow_id, "milestones/m1/release")
    assert status == 200, body

    def m1_released(e: dict[str, Any]) -> bool:
        return any(m["milestoneId"] == "m1" and m["status"] == "RELEASED" for m in e["milestones"])

    assert escrow_when(w.stack, w.worker, buyer, escrow_id, m1_released, SETTLED_WAIT_S)
    assert transfers_to(w, escrow_id) == [account_id]


def test_dispute_release_needs_both_parties_verified(world: World) -> None:
    w = world
    buyer, seller = parties(w)
    account_id = onboard_stripe(w, seller)
    escrow_id = usd_escrow(w, buyer, seller)
    assert act(w, seller, escrow_id, "deliver", {})[0] == 200
    assert act(w, buyer, escrow_id, "dispute", {"reason": "not as described"})[0] == 200

    kyc(w, seller, "REJECTED")
    resolve = {"resolution": "RELEASE", "reason": "delivery matches"}
    status, _, problem = act(w, "ops", escrow_id, "dispute/resolve", resolve, Role.ADMIN)
    assert (status, problem["code"]) == (403, "KYC_REQUIRED"), problem

    kyc(w, seller, "VERIFIED")
    status, _, body = act(w, "ops", escrow_id, "dispute/resolve", resolve, Role.ADMIN)
    assert status == 200, body
    released = escrow_when(w.stack, w.worker, buyer, escrow_id, status_is("RELEASED"), 60)
    assert released is not None, w.worker.log_tail()
    assert transfers_to(w, escrow_id) == [account_id]
