"""Faust agents: command processor, mirror, payments effects, outbox publisher, timeouts."""
