"""Fixtures shared by the end-to-end modules: the Stripe fault proxy in front of stripe-mock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.standins.stripe_proxy import StripeProxy


@pytest.fixture(scope="module")
def proxy() -> Iterator[StripeProxy]:
    """One proxy per module; its worker gets ``STRIPE_API_BASE=proxy.url``."""
    proxy = StripeProxy().start()
    yield proxy
    proxy.stop()


@pytest.fixture(autouse=True)
def no_faults_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Faults one test programs at the proxy never reach the next (tests that use it)."""
    if "proxy" not in request.fixturenames:
        yield
        return
    proxy: StripeProxy = request.getfixturevalue("proxy")
    proxy.clear_faults()
    yield
    proxy.clear_faults()
