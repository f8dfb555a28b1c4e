"""Outgoing webhooks: signed event deliveries to the URLs developers register."""

from swarmgate.webhooks.delivery import EVENT_TYPES, ChargeEvent, Webhooks
from swarmgate.webhooks.signing import SignatureError, verify

__all__ = ["EVENT_TYPES", "ChargeEvent", "SignatureError", "Webhooks", "verify"]
