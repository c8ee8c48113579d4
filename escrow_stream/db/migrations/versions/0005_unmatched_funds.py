"""Unmatched funds, PaymentIntent cancellation, chargeback holds (SPEC §10).

* ``unmatched_funds``: money that arrived and that no escrow accepted (a payment for a
  cancelled escrow, a second or a short USDC deposit, a flagged sender), recorded once per
  provider object and handled automatically: returned (RETURNING → RETURNED), frozen for
  compliance (FROZEN), or left to a person (NEEDS_REVIEW).  ``commands_topic`` scopes the
  rows to the deployment that recorded them, as for ``payment_effects``.
* ``payment_effects`` gains the effect ``CANCEL_INSTRUCTIONS`` (cancel an unfunded escrow's
  PaymentIntent) and ``held``: a settlement held while a chargeback is open is not sent.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = [
    """
    CREATE TABLE unmatched_funds (
        funds_id            text PRIMARY KEY,
        provider            text NOT NULL CHECK (provider IN ('stripe', 'custodian')),
        provider_object_id  text NOT NULL,
        escrow_id           text,
        commands_topic      text NOT NULL,
        amount              bigint NOT NULL CHECK (amount >= 0),
        currency            text NOT NULL,
        reason              text NOT NULL,
        detail              text,
        status              text NOT NULL
                            CHECK (status IN ('RETURNING', 'RETURNED', 'FROZEN', 'NEEDS_REVIEW')),
        sender_address      text,
        return_reference    text,
        attempts            integer NOT NULL DEFAULT 0,
        next_attempt_at     timestamptz,
        last_error          text,
        screening           jsonb,
        created_at          timestamptz NOT NULL,
        updated_at          timestamptz NOT NULL,
        resolved_at         timestamptz,
        UNIQUE (provider, provider_object_id)
    )
    """,
    "CREATE INDEX unmatched_funds_escrow_id_idx ON unmatched_funds (escrow_id)",
    "CREATE INDEX unmatched_funds_status_idx ON unmatched_funds (status, created_at)",
    """
    CREATE INDEX unmatched_funds_due_idx ON unmatched_funds (commands_topic, next_attempt_at)
     WHERE status = 'RETURNING' AND next_attempt_at IS NOT NULL
    """,
    "ALTER TABLE payment_effects DROP CONSTRAINT payment_effects_effect_check",
    """
    ALTER TABLE payment_effects ADD CONSTRAINT payment_effects_effect_check
          CHECK (effect IN ('INSTRUCTIONS', 'SETTLEMENT', 'CANCEL_INSTRUCTIONS'))
    """,
    "ALTER TABLE payment_effects ADD COLUMN held boolean NOT NULL DEFAULT false",
]

DOWNGRADE = [
    "ALTER TABLE payment_effects DROP COLUMN IF EXISTS held",
    "DELETE FROM payment_effects WHERE effect = 'CANCEL_INSTRUCTIONS'",
    "ALTER TABLE payment_effects DROP CONSTRAINT payment_effects_effect_check",
    """
    ALTER TABLE payment_effects ADD CONSTRAINT payment_effects_effect_check
          CHECK (effect IN ('INSTRUCTIONS', 'SETTLEMENT'))
    """,
    "DROP TABLE IF EXISTS unmatched_funds",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
