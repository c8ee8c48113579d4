"""Custodian deposits belong to the deployment whose webhook recorded them; payment effects
are found by their provider object.

The deposit-screening loop of every deployment sharing a database claimed every deposit, and
sent the screened deposit's command to its own commands topic: another deployment's escrow
was then "not found" there.  ``commands_topic`` scopes the rows as ``payment_effects`` and
``unmatched_funds`` are scoped; rows recorded before it (NULL) are screened by any.

A Stripe dispute names only the PaymentIntent: the chargeback webhook finds its escrow through
the PaymentIntent effect's ``provider_object_id``, indexed here.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE custodian_deposits ADD COLUMN commands_topic text")
    op.execute(
        "CREATE INDEX payment_effects_provider_object_idx ON payment_effects (provider_object_id)"
    )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS payment_effects_provider_object_idx")
    op.execute("ALTER TABLE custodian_deposits DROP COLUMN IF EXISTS commands_topic")
