"""Custodian deposits: the USDC that arrived for an escrow, and its risk screening.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = [
    """
    CREATE TABLE custodian_deposits (
        deposit_id       text PRIMARY KEY,
        escrow_id        text NOT NULL,
        deposit_address  text NOT NULL,
        sender_address   text NOT NULL,
        tx_hash          text,
        amount           bigint NOT NULL CHECK (amount > 0),
        asset            text NOT NULL,
        confirmations    integer NOT NULL CHECK (confirmations >= 0),
        status           text NOT NULL CHECK (status IN ('SCREENING', 'CLEARED', 'FROZEN')),
        attempts         integer NOT NULL DEFAULT 0,
        next_attempt_at  timestamptz NOT NULL,
        last_error       text,
        screening        jsonb,
        received_at      timestamptz NOT NULL,
        screened_at      timestamptz
    )
    """,
    "CREATE INDEX custodian_deposits_escrow_id_idx ON custodian_deposits (escrow_id)",
    """
    CREATE INDEX custodian_deposits_due_idx ON custodian_deposits (next_attempt_at)
     WHERE status = 'SCREENING'
    """,
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS custodian_deposits")
