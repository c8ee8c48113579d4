"""RiskScreener against the TRM Labs and Chainalysis stand-ins over real HTTP: verdicts,
bounded retries, timeouts, refusals, and that no error is ever a pass."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest

from escrow_stream.config import load_settings
from escrow_stream.payments.risk import (
    CHAINALYSIS_ENTITIES_PATH,
    TRM_SCREENING_PATH,
    ProviderVerdict,
    RiskScreener,
    ScreeningUnavailable,
    Verdict,
)
from tests.harness import free_port
from tests.standins.risk import ChainalysisStandin, TrmStandin

pytestmark = pytest.mark.integration

MAX_RETRIES = 2


def wallet(seed: str) -> str:
    return "0x" + hashlib.sha256(f"{seed}:{uuid.uuid4()}".encode()).hexdigest()[:40]


@pytest.fixture
def trm() -> Iterator[TrmStandin]:
    with TrmStandin(api_key=f"trm-key-{uuid.uuid4().hex}") as standin:
        yield standin


@pytest.fixture
def chainalysis() -> Iterator[ChainalysisStandin]:
    with ChainalysisStandin(api_key=f"ca-key-{uuid.uuid4().hex}") as standin:
        yield standin


@asynccontextmanager
async def screener(
    trm: TrmStandin, chainalysis: ChainalysisStandin, **env: str
) -> AsyncIterator[RiskScreener]:
    settings = load_settings(
        {
            "NODE_ENV": "test",
            "TRM_API_URL": trm.url,
            "TRM_API_KEY": trm.api_key,
            "CHAINALYSIS_API_URL": chainalysis.url,
            "CHAINALYSIS_API_KEY": chainalysis.api_key,
            "ESCROW_MAX_RETRIES": str(MAX_RETRIES),
            "ESCROW_RETRY_DELAY_MS": "10",
            "PROVIDER_TIMEOUT_MS": "2000",
            **env,
        }
    )
    screening = RiskScreener(settings)
    try:
        yield screening
    finally:
        await screening.aclose()


def assert_no_keys(text: str, *standins: TrmStandin | ChainalysisStandin) -> None:
    for standin in standins:
        assert standin.api_key not in text


async def test_a_clean_address_passes_both(
    trm: TrmStandin, chainalysis: ChainalysisStandin
) -> None:
    sender = wallet("clean")
    async with screener(trm, chainalysis) as s:
        verdict = await s.screen(sender, reference="escrow-1")
    assert verdict.passed
    assert [(p.provider, p.passed, p.risk) for p in verdict.providers] == [
        ("trm", True, "Low"),
        ("chainalysis", True, "Low"),
    ]
    assert verdict.reasons() == []
    # the documented requests, each once, with the documented bodies
    assert [(r["method"], r["path"], r["body"], r["status"]) for r in trm.requests] == [
        (
            "POST",
            TRM_SCREENING_PATH,
            [{"address": sender, "chain": "base", "accountExternalId": "escrow-1"}],
            200,
        )
    ]
    assert [(r["method"], r["path"], r["status"]) for r in chainalysis.requests] == [
        ("POST", CHAINALYSIS_ENTITIES_PATH, 201),
        ("GET", f"{CHAINALYSIS_ENTITIES_PATH}/{sender}", 200),
    ]
    assert chainalysis.requests[0]["body"] == {"address": sender}
    record = json.dumps([p.raw for p in verdict.providers])
    assert sender.lower() in record.lower()
    assert_no_keys(record, trm, chainalysis)


async def test_sanctioned_on_trm_only_fails_naming_trm(
    trm: TrmStandin, chainalysis: ChainalysisStandin
) -> None:
    sender = wallet("sanctioned")
    trm.flag(sender)
    async with screener(trm, chainalysis) as s:
        verdict = await s.screen(sender)
    assert not verdict.passed
    by_provider = {p.provider: p for p in verdict.providers}
    assert not by_provider["trm"].passed
    assert by_provider["trm"].risk == "Severe"
    assert by_provider["chainalysis"].passed
    assert verdict.reasons()
    assert all(r.startswith("trm: ") for r in verdict.reasons())
    assert any("Sanctions" in r for r in verdict.reasons())
    assert by_provider["trm"].raw["flagged"]


async def test_high_risk_on_chainalysis_only_fails(
    trm: TrmStandin, chainalysis: ChainalysisStandin
) -> None:
    sender = wallet("mixer")
    chainalysis.high_risk(sender)
    async with screener(trm, chainalysis) as s:
        verdict = await s.screen(sender)
    assert not verdict.passed
    by_provider = {p.provider: p for p in verdict.providers}
    assert by_provider["trm"].passed
    assert not by_provider["chainalysis"].passed
    assert by_provider["chainalysis"].risk == "High"
    assert verdict.reasons() == ["chainalysis: risk High: Significant direct exposure to mixing"]


async def test_sanctioned_on_chainalysis_names_the_identification(
    trm: TrmStandin, chainalysis: ChainalysisStandin
) -> None:
    sender = wallet("sdn")
    chainalysis.flag(sender)  # Severe and identified as sanctioned
    async with screener(trm, chainalysis) as s:
        verdict = await s.screen(sender)
    assert not verdict.passed
    assert any("identified as sanctioned" in r for r in verdict.reasons())


async def test_medium_risk_passes_and_high_on_trm_fails(
    trm: TrmStandin, chainalysis: ChainalysisStandin
) -> None:
    medium, high = wallet("medium"), wallet("high")
    trm.flag(medium, "Gambling", "Medium")
    chainalysis.flag(medium, "Medium", "gambling")
    trm.high_risk(high)
    async with screener(trm, chainalysis) as s:
        assert (await s.screen(medium)).passed
        verdict = await s.screen(high)
    assert not verdict.passed
    assert [p.provider for p in verdict.providers if not p.passed] == ["trm"]


async def test_a_500_then_success_is_retried_and_passes(
    trm: TrmStandin, chainalysis: ChainalysisStandin
) -> None:
    trm.fail_next(1)
    async with screener(trm, chainalysis) as s:
        verdict = await s.screen(wallet("flaky"))
    assert verdict.passed
    assert [r["status"] for r in trm.requests] == [500, 200]


async def test_a_429_is_retried_after_retry_after(
    trm: TrmStandin, chainalysis: ChainalysisStandin
) -> None:
    chainalysis.throttle_next(1, retry_after_s=0)
    async with screener(trm, chainalysis) as s:
        verdict = await s.screen(wallet("throttled"))
    assert verdict.passed
    assert [r["status"] for r in chainalysis.requests] == [429, 201, 200]


async def test_persistent_500s_are_unavailable_after_bounded_attempts(
    trm: TrmStandin, chainalysis: ChainalysisStandin
) -> None:
    trm.fail_next(100)
    async with screener(trm, chainalysis) as s:
        with pytest.raises(ScreeningUnavailable, match="trm: HTTP 500"):
            await s.screen(wallet("down"))
    assert [r["status"] for r in trm.requests] == [500] * (1 + MAX_RETRIES)


async def test_chainalysis_down_is_unavailable_even_when_trm_passed(
    trm: TrmStandin, chainalysis: ChainalysisStandin
) -> None:
    chainalysis.fail_next(100, status=503)
    async with screener(trm, chainalysis, ESCROW_MAX_RETRIES="0") as s:
        with pytest.raises(ScreeningUnavailable, match="chainalysis: HTTP 503"):
            await s.screen(wallet("half"))
    assert len(chainalysis.requests) == 1


async def test_a_timeout_is_unavailable(trm: TrmStandin, chainalysis: ChainalysisStandin) -> None:
    trm.delay_next(100, delay_s=1.0)
    async with screener(trm, chainalysis, PROVIDER_TIMEOUT_MS="200", ESCROW_MAX_RETRIES="1") as s:
        with pytest.raises(ScreeningUnavailable, match="trm: ReadTimeout"):
            await s.screen(wallet("slow"))
    assert len(trm.requests) == 2
    trm.clear_faults()


async def test_nothing_listening_is_unavailable_after_bounded_attempts(
    trm: TrmStandin, chainalysis: ChainalysisStandin
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with screener(trm, chainalysis, CHAINALYSIS_API_URL=closed) as s:
        with pytest.raises(
            ScreeningUnavailable, match=r"chainalysis: ConnectError.*3 attempt"
        ) as e:
            await s.screen(wallet("nobody"))
    assert_no_keys(str(e.value), trm, chainalysis)


@pytest.mark.parametrize("wrong", ["trm", "chainalysis"])
async def test_a_wrong_key_is_unavailable_never_a_pass(
    trm: TrmStandin, chainalysis: ChainalysisStandin, wrong: str
) -> None:
    env = {f"{wrong.upper()}_API_KEY": "not-the-right-key"}
    async with screener(trm, chainalysis, **env) as s:
        with pytest.raises(ScreeningUnavailable, match="API key was refused") as raised:
            await s.screen(wallet("wrong-key"))
    refused = trm if wrong == "trm" else chainalysis
    assert [r["status"] for r in refused.requests] == [401]  # not retried
    assert_no_keys(str(raised.value), trm, chainalysis)
    assert "not-the-right-key" not in str(raised.value)
    assert raised.value.__cause__ is None


@pytest.mark.parametrize(
    "address",
    [
        "",
        "0x123",
        "not-an-address",
        "0x" + "g" * 40,
        "0x" + "a" * 41,
        " 0x" + "a" * 40,
        "0X" + "a" * 40,
    ],
)
async def test_an_invalid_address_sends_nothing(
    trm: TrmStandin, chainalysis: ChainalysisStandin, address: str
) -> None:
    async with screener(trm, chainalysis) as s:
        with pytest.raises(ValueError, match="not a 0x address"):
            await s.screen(address)
    assert trm.requests == []
    assert chainalysis.requests == []


async def test_chainalysis_pending_is_unavailable(
    trm: TrmStandin, chainalysis: ChainalysisStandin
) -> None:
    sender = wallet("pending")
    chainalysis.set_status("PENDING", sender)
    async with screener(trm, chainalysis) as s:
        with pytest.raises(ScreeningUnavailable, match=r"not complete \(status PENDING\)"):
            await s.screen(sender)
        chainalysis.set_status("COMPLETE", sender)
        assert (await s.screen(sender)).passed


async def test_a_non_json_answer_is_unavailable_not_retried(
    trm: TrmStandin, chainalysis: ChainalysisStandin
) -> None:
    trm.malformed_next(1)
    async with screener(trm, chainalysis) as s:
        with pytest.raises(ScreeningUnavailable, match="trm: malformed answer"):
            await s.screen(wallet("html"))
    assert len(trm.requests) == 1


async def test_the_standins_refuse_malformed_bodies(
    trm: TrmStandin, chainalysis: ChainalysisStandin
) -> None:
    async with httpx.AsyncClient() as http:
        trm_auth = httpx.BasicAuth(trm.api_key, trm.api_key)
        url = trm.url + TRM_SCREENING_PATH
        assert (await http.post(url, json={"address": "0x"}, auth=trm_auth)).status_code == 400
        assert (await http.post(url, content=b"{", auth=trm_auth)).status_code == 400
        assert (await http.post(url, json=[{"address": "0x1"}], auth=trm_auth)).status_code == 400
        basic_one = httpx.BasicAuth(trm.api_key, "other")
        assert (await http.post(url, json=[], auth=basic_one)).status_code == 401
        token = {"Token": chainalysis.api_key}
        url = chainalysis.url + CHAINALYSIS_ENTITIES_PATH
        assert (await http.post(url, json=["0x1"], headers=token)).status_code == 400
        assert (await http.post(url, json={"address": "0x1"})).status_code == 401


def test_a_verdict_cannot_pass_over_a_failed_provider() -> None:
    failed = ProviderVerdict("trm", False, "Severe", ("Sanctions",))
    with pytest.raises(ValueError):
        Verdict(True, (failed,))
    assert not Verdict.of([failed]).passed
    assert not Verdict.of([]).passed
