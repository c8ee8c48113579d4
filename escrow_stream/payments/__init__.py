"""Payment provider clients: the only code that talks to Stripe, the custodian, risk screening."""
