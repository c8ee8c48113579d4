"""Faust's Kafka transport with one correction: never commit over a message not yet processed.

faust-streaming (0.15) decides what to commit in ``Consumer._new_offset`` from the offsets
its streams acknowledged.  When the first acknowledged offset is exactly one past the
committed offset, it takes the missing offset for a hole in the log (a transaction marker
or a compacted record) and commits over it — also when that offset is a real message that
is still being processed, or that the fetcher has not delivered again yet after a
rebalance reset its position (faust-streaming issue #606, open).  A crash after such a
commit loses the message: the SIGKILL fault test saw a command with no outcome at all.

The correction: a hole between the committed offset and the first acknowledged offset may
be committed over only when the fetcher has read past it (so a real message there would
have been delivered) and none of its offsets is a message delivered to a stream and not yet
acknowledged.  Otherwise nothing is committed for that partition this time; the next
commit, after the hole is processed, covers it.  This can only commit later, never earlier.
"""

from __future__ import annotations

from collections.abc import Iterable

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP
from faust.types.transports import TransportT


def may_commit_over_hole(
    committed: int | None, first_acked: int, read_offset: int | None, in_flight: Iterable[int]
) -> bool:
    """Whether offsets ``committed .. first_acked - 1`` (not acknowledged) may be skipped."""
    if committed is None or first_acked <= committed:
        return True  # no hole
    if read_offset is None or read_offset < first_acked:
        return False  # the fetcher has not delivered the hole's offsets (again) yet
    return not any(committed <= offset < first_acked for offset in in_flight)


class Consumer(aiokafka_driver.Consumer):
    def _new_offset(self, tp: TP) -> int | None:
        acked = self._acked[tp]
        if acked:
            in_flight = [
                m.offset for m in list(self._unacked_messages) if m.tp == tp and not m.acked
            ]
            if not may_commit_over_hole(
                self._committed_offset[tp], min(acked), self._read_offset[tp], in_flight
            ):
                return None
        return super()._new_offset(tp)


class Transport(aiokafka_driver.Transport):
    Consumer = Consumer


class App(faust.App):
    """``faust.App`` consuming through :class:`Transport`."""

    def _new_transport(self) -> TransportT:
        return Transport(self.conf.broker_consumer, self)
