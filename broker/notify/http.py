"""Channels that POST JSON over HTTPS: a generic signed webhook, Slack (incoming webhook, Block
Kit) and Microsoft Teams (a workflow webhook, Adaptive Card). One retry policy for all three:
network errors, 5xx and 429 are retried with exponential backoff and jitter, within a bounded
number of attempts and a total deadline; any other 4xx is final."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
from collections.abc import Callable
from typing import Any

import httpx

from broker.notify.base import DeliveryFailed, Notification
from broker.types import Sensitive

SIGNATURE_HEADER = "X-Broker-Signature"
TIMESTAMP_HEADER = "X-Broker-Timestamp"


class RetryPolicy:
    def __init__(
        self,
        *,
        max_attempts: int = 4,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        deadline: float = 30.0,
        timeout: float = 5.0,
    ) -> None:
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.deadline = deadline
        self.timeout = timeout

    def delay(self, attempt: int) -> float:
        """Full jitter: a random wait up to base * 2^(attempt-1), capped."""
        cap = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(0, cap)  # noqa: S311 (jitter, not a secret)


async def post_json(
    http: httpx.AsyncClient,
    url: Sensitive,
    body: dict[str, Any],
    retry: RetryPolicy,
    headers: Callable[[bytes], dict[str, str]] | None = None,
) -> int:
    """POST `body` until it is accepted (2xx); returns the attempts it took. `headers` is
    called for each attempt with the exact bytes sent (a fresh signature per attempt)."""
    payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    started = time.monotonic()
    reason = "unreachable"
    for attempt in range(1, retry.max_attempts + 1):
        sent_headers = {"Content-Type": "application/json"}
        if headers is not None:
            sent_headers.update(headers(payload))
        try:
            response = await http.post(
                url.reveal(), content=payload, headers=sent_headers, timeout=retry.timeout
            )
        except httpx.TimeoutException:
            reason = "timeout"
        except httpx.HTTPError:
            reason = "unreachable"
        else:
            if 200 <= response.status_code < 300:
                return attempt
            reason = f"http_{response.status_code}"
            if response.status_code < 500 and response.status_code != 429:
                raise DeliveryFailed(reason, attempt)  # the receiver refuses: retrying won't help
        wait = retry.delay(attempt)
        if attempt == retry.max_attempts or time.monotonic() - started + wait > retry.deadline:
            raise DeliveryFailed(reason, attempt)
        await asyncio.sleep(wait)
    raise DeliveryFailed(reason, retry.max_attempts)


def signature(secret: bytes, timestamp: str, payload: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>``: what a receiver recomputes
    (and compares in constant time) before trusting a webhook."""
    mac = hmac.new(secret, timestamp.encode() + b"." + payload, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class WebhookChannel:
    """A generic webhook: the notification as JSON, signed with HMAC-SHA256 over the timestamp
    and the body, with an ``Idempotency-Key`` that stays the same across retries."""

    kind = "webhook"

    def __init__(
        self,
        name: str,
        url: Sensitive,
        secret: Sensitive,
        http: httpx.AsyncClient,
        retry: RetryPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._url = url
        self._secret = secret
        self._http = http
        self._retry = retry
        self._clock = clock

    async def send(self, notification: Notification) -> int:
        def headers(payload: bytes) -> dict[str, str]:
            timestamp = str(int(self._clock()))
            return {
                TIMESTAMP_HEADER: timestamp,
                SIGNATURE_HEADER: signature(self._secret.reveal().encode(), timestamp, payload),
                "Idempotency-Key": notification.idempotency_key,
            }

        return await post_json(self._http, self._url, notification.as_json(), self._retry, headers)


def slack_blocks(notification: Notification) -> dict[str, Any]:
    """A Block Kit message: a header, the text, the facts as fields, a button to the page."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": notification.title[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape(notification.text)}},
    ]
    if notification.fields:
        blocks.append(
            {
                "type": "section",
                "fields": [
                    {"type": "mrkdwn", "text": f"*{_slack_escape(k)}*\n{_slack_escape(v)}"}
                    for k, v in notification.fields[:10]
                ],
            }
        )
    if notification.url:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open"},
                        "url": notification.url,
                        "style": "primary",
                    }
                ],
            }
        )
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": notification.event}]})
    return {"text": notification.title, "blocks": blocks}


def _slack_escape(text: str) -> str:
    """Slack's three control characters (so a binding message cannot ping @channel)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")[:3000]


class JsonWebhookChannel:
    """A channel that POSTs `body(notification)` to a secret URL (Slack, Teams)."""

    def __init__(
        self,
        name: str,
        kind: str,
        url: Sensitive,
        body: Callable[[Notification], dict[str, Any]],
        http: httpx.AsyncClient,
        retry: RetryPolicy,
    ) -> None:
        self.name = name
        self.kind = kind
        self._url = url
        self._body = body
        self._http = http
        self._retry = retry

    async def send(self, notification: Notification) -> int:
        return await post_json(self._http, self._url, self._body(notification), self._retry)


def adaptive_card(notification: Notification) -> dict[str, Any]:
    """A Teams workflow-webhook message holding an Adaptive Card (1.4)."""
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": notification.title,
            "weight": "Bolder",
            "size": "Medium",
            "wrap": True,
        },
        {"type": "TextBlock", "text": notification.text, "wrap": True},
    ]
    if notification.fields:
        body.append(
            {"type": "FactSet", "facts": [{"title": k, "value": v} for k, v in notification.fields]}
        )
    card: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": body,
    }
    if notification.url:
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Open", "url": notification.url}]
    return {
        "type": "message",
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}
        ],
    }
