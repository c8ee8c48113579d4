"""The commit correction of escrow_stream.transport (faust-streaming #606)."""

from __future__ import annotations

import pytest

from escrow_stream.transport import may_commit_over_hole


@pytest.mark.parametrize(
    ("committed", "first_acked", "read_offset", "in_flight", "allowed"),
    [
        (None, 0, 0, [], True),  # nothing committed yet
        (40, 40, 40, [], True),  # no hole: the head is the next offset
        (40, 40, 45, [41], True),  # in-flight messages after the head do not matter here
        # faust would commit over 40 in each of these; the correction does not:
        (40, 41, 41, [40], False),  # 40 is still being processed (#606)
        (40, 41, 40, [], False),  # after a seek: 40 not delivered again yet, 41 acked early
        (40, 43, 41, [], False),  # the fetcher has not read past the hole
        # a real hole (transaction marker, compacted record): read past, nothing in flight
        (40, 41, 41, [], True),
        (40, 43, 50, [44, 45], True),
    ],
)
def test_a_hole_is_skipped_only_when_it_holds_no_message(
    committed: int | None,
    first_acked: int,
    read_offset: int | None,
    in_flight: list[int],
    allowed: bool,
) -> None:
    assert may_commit_over_hole(committed, first_acked, read_offset, in_flight) is allowed


def test_the_app_consumes_through_the_corrected_transport() -> None:
    from escrow_stream import transport
    from escrow_stream.app import create_app
    from escrow_stream.config import load_settings

    app = create_app(load_settings({"NODE_ENV": "test", "PAYMENTS_EFFECTS_ENABLED": "false"}))
    assert isinstance(app.transport, transport.Transport)
    assert app.transport.Consumer is transport.Consumer
