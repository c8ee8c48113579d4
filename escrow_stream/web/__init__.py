"""Faust web views: gateway, webhooks, health, metrics, middleware, OpenAPI."""
