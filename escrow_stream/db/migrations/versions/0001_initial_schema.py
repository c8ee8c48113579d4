"""Initial schema: the seed's tables and indexes, ledger entries, KYC status, mirror offsets.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Amounts are integers in minor units (bigint holds 9.2e18: USDC base units of 9.2e12 USDC).
UPGRADE = [
    """
    CREATE TABLE escrows (
        id               text PRIMARY KEY,
        offer_id         text NOT NULL,
        contract_id      text NOT NULL,
        buyer_id         text NOT NULL,
        seller_id        text NOT NULL,
        rail             text NOT NULL CHECK (rail IN ('STRIPE', 'USDC_BASE')),
        currency         text NOT NULL CHECK (currency IN ('USD', 'USDC')),
        amount           bigint NOT NULL CHECK (amount > 0),
        status           text NOT NULL CHECK (status IN ('AWAIT_FUNDS', 'FUNDS_HELD',
                             'DELIVERED', 'DISPUTED', 'RELEASED', 'REFUNDED', 'CANCELLED')),
        version          integer NOT NULL CHECK (version > 0),
        funded_amount    bigint NOT NULL DEFAULT 0,
        released_amount  bigint NOT NULL DEFAULT 0,
        refunded_amount  bigint NOT NULL DEFAULT 0,
        settlement       jsonb,
        snapshot         jsonb NOT NULL,
        created_at       timestamptz NOT NULL,
        updated_at       timestamptz NOT NULL,
        expires_at       timestamptz,
        auto_refund_at   timestamptz,
        mirrored_at      timestamptz NOT NULL DEFAULT now()
    )
    """,
    "CREATE INDEX escrows_offer_id_idx ON escrows (offer_id)",
    "CREATE INDEX escrows_contract_id_idx ON escrows (contract_id)",
    "CREATE INDEX escrows_status_idx ON escrows (status)",
    "CREATE INDEX escrows_rail_idx ON escrows (rail)",
    "CREATE INDEX escrows_expires_at_idx ON escrows (expires_at)",
    "CREATE INDEX escrows_auto_refund_at_idx ON escrows (auto_refund_at)",
    "CREATE INDEX escrows_buyer_id_idx ON escrows (buyer_id)",
    "CREATE INDEX escrows_seller_id_idx ON escrows (seller_id)",
    """
    CREATE TABLE escrow_events (
        event_id        uuid PRIMARY KEY,
        escrow_id       text NOT NULL,
        version         integer NOT NULL,
        event_type      text NOT NULL,
        occurred_at     timestamptz NOT NULL,
        causation_id    text,
        correlation_id  text,
        trace_id        text,
        data            jsonb NOT NULL,
        snapshot        jsonb NOT NULL,
        kafka_partition integer,
        kafka_offset    bigint,
        recorded_at     timestamptz NOT NULL DEFAULT now(),
        UNIQUE (escrow_id, version)
    )
    """,
    "CREATE INDEX escrow_events_escrow_id_idx ON escrow_events (escrow_id)",
    """
    CREATE TABLE outbox (
        id               bigserial PRIMARY KEY,
        aggregate_id     text NOT NULL,
        topic            text NOT NULL,
        message_key      text NOT NULL,
        payload          bytea NOT NULL,
        headers          jsonb NOT NULL DEFAULT '{}'::jsonb,
        created_at       timestamptz NOT NULL DEFAULT now(),
        published_at     timestamptz,
        attempts         integer NOT NULL DEFAULT 0,
        next_attempt_at  timestamptz NOT NULL DEFAULT now(),
        last_error       text,
        dead_lettered_at timestamptz
    )
    """,
    # The seed's partial index: only unpublished rows are polled.
    """
    CREATE INDEX outbox_unpublished_idx ON outbox (created_at)
        WHERE published_at IS NULL AND dead_lettered_at IS NULL
    """,
    "CREATE INDEX outbox_aggregate_id_idx ON outbox (aggregate_id)",
    """
    CREATE TABLE command_idempotency (
        user_id          text NOT NULL,
        idempotency_key  text NOT NULL,
        request_hash     text NOT NULL,
        state            text NOT NULL CHECK (state IN ('in_flight', 'completed')),
        response_status  integer,
        response_body    jsonb,
        created_at       timestamptz NOT NULL DEFAULT now(),
        expires_at       timestamptz NOT NULL,
        PRIMARY KEY (user_id, idempotency_key)
    )
    """,
    "CREATE INDEX command_idempotency_expires_at_idx ON command_idempotency (expires_at)",
    """
    CREATE TABLE stripe_escrows (
        escrow_id          text PRIMARY KEY REFERENCES escrows (id) ON DELETE CASCADE,
        payment_intent_id  text UNIQUE,
        transfer_id        text,
        refund_id          text,
        updated_at         timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE stablecoin_escrows (
        escrow_id        text PRIMARY KEY REFERENCES escrows (id) ON DELETE CASCADE,
        deposit_id       text UNIQUE,
        deposit_address  text,
        sender_address   text,
        transfer_id      text,
        frozen           boolean NOT NULL DEFAULT false,
        updated_at       timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE milestone_escrows (
        escrow_id     text NOT NULL REFERENCES escrows (id) ON DELETE CASCADE,
        milestone_id  text NOT NULL,
        title         text NOT NULL,
        amount        bigint NOT NULL CHECK (amount > 0),
        status        text NOT NULL,
        updated_at    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (escrow_id, milestone_id)
    )
    """,
    """
    CREATE TABLE deliveries (
        event_id       uuid PRIMARY KEY,
        escrow_id      text NOT NULL,
        milestone_id   text,
        note           text,
        evidence_keys  jsonb NOT NULL DEFAULT '[]'::jsonb,
        delivered_at   timestamptz NOT NULL
    )
    """,
    "CREATE INDEX deliveries_escrow_id_idx ON deliveries (escrow_id)",
    """
    CREATE TABLE disputes (
        escrow_id      text PRIMARY KEY,
        raised_by      text,
        reason         text,
        evidence_keys  jsonb NOT NULL DEFAULT '[]'::jsonb,
        raised_at      timestamptz NOT NULL,
        resolution     text,
        resolved_by    text,
        resolved_at    timestamptz
    )
    """,
    """
    CREATE TABLE audit_logs (
        id           bigserial PRIMARY KEY,
        event_id     uuid NOT NULL UNIQUE,
        escrow_id    text NOT NULL,
        actor_id     text,
        actor_role   text,
        action       text NOT NULL,
        from_status  text,
        to_status    text NOT NULL,
        created_at   timestamptz NOT NULL
    )
    """,
    "CREATE INDEX audit_logs_escrow_id_idx ON audit_logs (escrow_id)",
    """
    CREATE TABLE ledger_entries (
        id         bigserial PRIMARY KEY,
        event_id   uuid NOT NULL,
        line_no    integer NOT NULL,
        escrow_id  text NOT NULL,
        account    text NOT NULL,
        currency   text NOT NULL,
        amount     bigint NOT NULL,
        posted_at  timestamptz NOT NULL,
        UNIQUE (event_id, line_no)
    )
    """,
    "CREATE INDEX ledger_entries_escrow_id_idx ON ledger_entries (escrow_id)",
    "CREATE INDEX ledger_entries_account_idx ON ledger_entries (account)",
    """
    CREATE TABLE kyc_status (
        user_id     text PRIMARY KEY,
        status      text NOT NULL CHECK (status IN ('PENDING', 'VERIFIED', 'REJECTED')),
        updated_by  text NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now()
    )
    """,
    # The mirror records the Kafka offset it applied in the same transaction as the rows.
    """
    CREATE TABLE consumer_offsets (
        consumer    text NOT NULL,
        topic       text NOT NULL,
        partition   integer NOT NULL,
        next_offset bigint NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer, topic, partition)
    )
    """,
]

TABLES_NEWEST_FIRST = [
    "consumer_offsets",
    "kyc_status",
    "ledger_entries",
    "audit_logs",
    "disputes",
    "deliveries",
    "milestone_escrows",
    "stablecoin_escrows",
    "stripe_escrows",
    "command_idempotency",
    "outbox",
    "escrow_events",
    "escrows",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for table in TABLES_NEWEST_FIRST:
        op.execute(f"DROP TABLE IF EXISTS {table}")
