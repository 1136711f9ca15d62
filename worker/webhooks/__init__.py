"""Webhooks (SPEC §10): the dispatcher that delivers the outbox, and the signing."""
