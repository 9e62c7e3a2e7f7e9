"""What a notification is, the `Channel` protocol every delivery plug-in implements, and the
`Notifier` that fans one notification out to named channels in the background.

Shared by approvals (a request waits for someone) and, later, budget alerts. A notification
carries what a person needs to act (a title, a few facts, a link to the page where they act),
never a token or secret; a channel's own secrets (a webhook URL, an HMAC key, an SMTP password)
stay inside the channel and never reach a record, a log line or a metric label.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from broker.audit import DecisionLog

log = logging.getLogger("broker.notify")


@dataclass(frozen=True, slots=True)
class Notification:
    event: str
    """What happened, e.g. ``approval.requested``."""
    title: str
    text: str
    idempotency_key: str
    """The same for every delivery attempt of this notification (receivers drop repeats)."""
    url: str | None = None
    """Where the reader acts (the approval's page)."""
    fields: tuple[tuple[str, str], ...] = ()
    recipients: tuple[str, ...] = ()
    """E-mail addresses this notification is also for (channels with ``to_recipients``)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "title": self.title,
            "text": self.text,
            "url": self.url,
            "fields": [{"name": name, "value": value} for name, value in self.fields],
            "idempotency_key": self.idempotency_key,
        }


class DeliveryFailed(Exception):
    """A channel gave up. `reason` is a fixed code (``unreachable``, ``http_500``, ``refused``,
    ``timeout``...): never a response body, a URL or a server's message."""

    def __init__(self, reason: str, attempts: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts


class Channel(Protocol):
    name: str
    kind: str

    async def send(self, notification: Notification) -> int:
        """Deliver once it is accepted; returns the attempts it took. Raises `DeliveryFailed`."""
        ...


class Notifier:
    """Fans notifications out to channels, each delivery a task of its own: the caller never
    waits, and a slow or failed channel never holds up another. Every outcome is recorded
    (``notification.delivered`` / ``notification.failed``) and counted."""

    def __init__(
        self,
        channels: Mapping[str, Channel],
        decisions: DecisionLog,
        *,
        on_outcome: Any = None,
    ) -> None:
        self._channels = dict(channels)
        self._decisions = decisions
        self._on_outcome = on_outcome
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(self._channels)

    def notify(self, channel_names: Iterable[str], notification: Notification) -> None:
        """Schedule delivery to each named channel (unknown names are recorded as failures).
        Must be called from the event loop."""
        for name in dict.fromkeys(channel_names):
            channel = self._channels.get(name)
            if channel is None:
                self._outcome(name, "unknown", notification, "failed", "unknown_channel", 0)
                continue
            task = asyncio.get_running_loop().create_task(self._deliver(channel, notification))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, channel: Channel, notification: Notification) -> None:
        try:
            attempts = await channel.send(notification)
        except DeliveryFailed as failed:
            self._outcome(
                channel.name, channel.kind, notification, "failed", failed.reason, failed.attempts
            )
        except Exception as exc:  # a plug-in bug must not escape into the loop unrecorded
            log.error("notification channel %s failed: %s", channel.name, type(exc).__name__)
            self._outcome(channel.name, channel.kind, notification, "failed", "error", 1)
        else:
            self._outcome(channel.name, channel.kind, notification, "delivered", None, attempts)

    def _outcome(
        self,
        channel: str,
        kind: str,
        notification: Notification,
        outcome: str,
        reason: str | None,
        attempts: int,
    ) -> None:
        try:
            self._decisions.record(
                f"notification.{outcome}",
                outcome=outcome,
                reason=reason,
                channel=channel,
                kind=kind,
                event_notified=notification.event,
                idempotency_key=notification.idempotency_key,
                attempts=attempts,
            )
        except Exception as exc:
            log.error("a notification outcome could not be recorded: %s", type(exc).__name__)
        if self._on_outcome is not None:
            self._on_outcome(channel, outcome)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait for every delivery in flight (tests; shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def aclose(self, timeout: float = 5.0) -> None:
        await self.drain(timeout)
        for task in list(self._tasks):
            task.cancel()
