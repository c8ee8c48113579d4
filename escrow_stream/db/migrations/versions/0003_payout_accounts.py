"""Payout accounts: where each seller is paid, per rail, and the releases resumed on activation.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = [
    """
    CREATE TABLE payout_accounts (
        user_id            text NOT NULL,
        rail               text NOT NULL CHECK (rail IN ('STRIPE', 'USDC_BASE')),
        destination        text NOT NULL,
        status             text NOT NULL CHECK (status IN ('PENDING', 'ACTIVE', 'REJECTED')),
        screening          jsonb,
        attempts           integer NOT NULL DEFAULT 0,
        next_screening_at  timestamptz,
        last_error         text,
        provider_event_at  timestamptz,
        activated_at       timestamptz,
        updated_by         text NOT NULL,
        created_at         timestamptz NOT NULL,
        updated_at         timestamptz NOT NULL,
        PRIMARY KEY (user_id, rail)
    )
    """,
    "CREATE INDEX payout_accounts_destination_idx ON payout_accounts (rail, destination)",
    """
    CREATE INDEX payout_accounts_screening_due_idx ON payout_accounts (next_screening_at)
     WHERE status = 'PENDING' AND rail = 'USDC_BASE'
    """,
    # one ResumeSettlement per (settlement, activation): enqueued once, whoever finds it
    """
    CREATE TABLE payout_resumes (
        command_id     text PRIMARY KEY,
        escrow_id      text NOT NULL,
        settlement_id  text NOT NULL,
        user_id        text NOT NULL,
        created_at     timestamptz NOT NULL
    )
    """,
    # the mirror's releases waiting for a payout account (few rows; read every sweep)
    """
    CREATE INDEX escrows_awaiting_payout_idx ON escrows (seller_id, rail)
     WHERE settlement ->> 'status' = 'AWAITING_PAYOUT_ACCOUNT'
    """,
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS escrows_awaiting_payout_idx")
    op.execute("DROP TABLE IF EXISTS payout_resumes")
    op.execute("DROP TABLE IF EXISTS payout_accounts")
