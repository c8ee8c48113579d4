"""The PostgreSQL mirror of ``escrow.events.v1`` (SPEC §8): history and current state.

:meth:`Mirror.apply` applies a batch of Kafka records in **one** database transaction:

1. **Offsets.** For every (topic, partition) of the batch the row of this consumer in
   ``consumer_offsets`` is created if missing and locked (``FOR UPDATE``, in a fixed order so
   two workers never deadlock).  Records below the stored ``next_offset`` were applied by an
   earlier transaction whose Kafka commit was lost (crash, rebalance): they are skipped.
2. **Parsing.** Each remaining record is decoded and validated with the domain's
   ``parse_event`` plus what PostgreSQL needs (UUID event and posting ids, no NUL characters,
   amounts within ``bigint``, snapshot of the same escrow).  A record that fails is logged,
   counted as ``invalid`` and skipped; the mirror never stops on bad input.  Within the batch
   an eventId seen before is a duplicate.
3. **History** (keyed by eventId, so a replay is a no-op): ``escrow_events`` is inserted with
   ``ON CONFLICT DO NOTHING``; only the events whose row was new get their ``audit_logs``
   row (from_status = status of the snapshot of version - 1, to_status = the snapshot's
   status) and, for EscrowDelivered / MilestoneDelivered, their ``deliveries`` row.  When an
   event arrives after its successor (never in per-partition order, but possible after a
   manual repair) the successor's missing ``from_status`` is filled in, so the audit log
   converges whatever the arrival order.
4. **Current state** (keyed by snapshot version): per escrow the newest snapshot of the batch
   is upserted into ``escrows`` with ``ON CONFLICT (id) DO UPDATE ... WHERE escrows.version <
   EXCLUDED.version``; only for the escrows whose row this changed are the snapshot-derived
   rows rewritten: ``stripe_escrows`` / ``stablecoin_escrows`` (payment ids, addresses),
   ``milestone_escrows`` and ``disputes``.  An older event therefore never overwrites newer
   state, and ``escrows.snapshot`` is always the newest snapshot seen.
5. **Derived from history** for every escrow the batch touched: ledger postings of the
   newest snapshot not yet in ``ledger_entries`` (a posting's id is the eventId of the event
   that made it; lines are keyed ``(event_id, line_no)`` with 1-based ``line_no``, so each
   posting is mirrored exactly once), the Stripe transfer / refund id and the stablecoin
   transfer id (the providerReference of the newest EscrowReleased / MilestoneReleased /
   EscrowRefunded event in ``escrow_events``), and ``disputes.resolved_by`` (the actor of the
   newest SettlementRequested carrying a resolution).  Computing these from the stored
   history instead of from "the event at hand" makes them independent of arrival order.
6. **Offsets** are advanced to ``max(offset) + 1`` per partition (``GREATEST`` with the
   stored value) for every record of the batch, skipped and invalid ones included.

Steps 3-5 run in a savepoint.  If PostgreSQL rejects the data (SQLSTATE class 22, 23 or 54:
something the validation of step 2 did not foresee) the batch is redone one event per
savepoint and the events PostgreSQL rejects are counted invalid, so one poison event cannot
wedge the mirror.  Any other error (connection lost, PostgreSQL restarting, serialization
failure) rolls back the whole transaction and propagates: nothing was applied, the caller
retries, and the offsets in ``consumer_offsets`` keep the retry exact.

**Guarantee.** Any sequence of an escrow's events, delivered any number of times, in any
batching, converges to the same rows, provided the events of one escrow are first seen in
version order (which one partition per escrowId gives).  Even without that order every table
but the audit log's ``to_status`` of a re-emitted event converges.  Caveat of the offset
check: if the events topic is recreated (offsets restart at 0) or the mirror is rebuilt from
an empty database by resetting the Kafka offsets, delete this consumer's rows from
``consumer_offsets`` first, or the records below the stored offsets are skipped.

**Modules.** ``transaction`` (:class:`Mirror`: the steps in this order, the savepoint),
``offsets`` (steps 1 and 6), ``records`` (step 2), ``history`` (step 3), ``escrows`` and
``rails`` (step 4), ``derived`` (step 5).  This docstring is the one description of the
transaction; the modules refer to its steps by number.
"""

from escrow_stream.db.projection.records import (
    BIGINT_MAX,
    BIGINT_MIN,
    INT_MAX,
    MirrorRecord,
    MirrorResult,
    RecordInvalid,
    parse_record,
)
from escrow_stream.db.projection.transaction import (
    DATA_ERROR_CLASSES,
    DEFAULT_CONSUMER,
    DELIVERY_EVENTS,
    Mirror,
    is_data_error,
)

__all__ = [
    "BIGINT_MAX",
    "BIGINT_MIN",
    "DATA_ERROR_CLASSES",
    "DEFAULT_CONSUMER",
    "DELIVERY_EVENTS",
    "INT_MAX",
    "Mirror",
    "MirrorRecord",
    "MirrorResult",
    "RecordInvalid",
    "is_data_error",
    "parse_record",
]
