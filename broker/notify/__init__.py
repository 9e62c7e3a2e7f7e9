"""Notification channels (webhook, Slack, Teams, e-mail) behind one protocol, and the `Notifier`
that fans a notification out to them in the background. Used by approvals and budget alerts."""

from broker.notify.base import Channel, DeliveryFailed, Notification, Notifier
from broker.notify.http import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from broker.notify.registry import build_channels

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Channel",
    "DeliveryFailed",
    "Notification",
    "Notifier",
    "build_channels",
    "signature",
]
