"""Payment effects: every provider call of the payments agent, recorded around the call.

``commands_topic`` is where the effect's result command goes: the deployment that recorded
the effect performs it (several deployments may share one database, as the tests do).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UPGRADE = [
    """
    CREATE TABLE payment_effects (
        effect_key          text PRIMARY KEY,
        escrow_id           text NOT NULL,
        commands_topic      text NOT NULL,
        effect              text NOT NULL CHECK (effect IN ('INSTRUCTIONS', 'SETTLEMENT')),
        rail                text NOT NULL,
        provider            text NOT NULL,
        state               text NOT NULL CHECK (state IN ('STARTED', 'SUCCEEDED', 'FAILED')),
        provider_object_id  text,
        error_code          text,
        error_message       text,
        attempts            integer NOT NULL DEFAULT 0,
        next_attempt_at     timestamptz,
        event               jsonb NOT NULL,
        result_type         text,
        result_payload      jsonb,
        client_secret       text,
        created_at          timestamptz NOT NULL,
        updated_at          timestamptz NOT NULL
    )
    """,
    "CREATE INDEX payment_effects_escrow_id_idx ON payment_effects (escrow_id)",
    """
    CREATE INDEX payment_effects_due_idx ON payment_effects (commands_topic, next_attempt_at)
     WHERE state = 'STARTED'
    """,
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS payment_effects")
