"""Build the configured channels (``notifications.channels``): configuration ``kind`` ->
implementation. Secrets are read here, once, into `Sensitive` values the channels keep."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from broker.notify.base import Channel
from broker.notify.email import EmailChannel
from broker.notify.http import (
    JsonWebhookChannel,
    RetryPolicy,
    WebhookChannel,
    adaptive_card,
    slack_blocks,
)
from broker.settings import (
    ChannelConfig,
    EmailChannelConfig,
    SlackChannelConfig,
    TeamsChannelConfig,
    WebhookChannelConfig,
)
from broker.types import Sensitive
from broker.urls import require_https_unless_loopback
from secret_backends.config import resolve_secret_reference


def _retry(config: ChannelConfig) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=config.max_attempts,
        deadline=config.deadline_seconds,
        timeout=config.timeout_seconds,
    )


def _secret_url(name: str, reference: str) -> Sensitive:
    url = resolve_secret_reference(reference)
    try:
        require_https_unless_loopback(url.reveal())
    except ValueError:
        raise ValueError(
            f"notifications.channels.{name}: the URL behind {reference} must be https "
            "(or http on loopback)"
        ) from None
    return url


def build_channels(
    configs: Mapping[str, ChannelConfig], http: httpx.AsyncClient
) -> dict[str, Channel]:
    channels: dict[str, Channel] = {}
    for name, config in configs.items():
        if isinstance(config, WebhookChannelConfig):
            channels[name] = WebhookChannel(
                name,
                Sensitive(config.url),
                resolve_secret_reference(config.secret_ref),
                http,
                _retry(config),
            )
        elif isinstance(config, SlackChannelConfig):
            url = _secret_url(name, config.url_ref)
            channels[name] = JsonWebhookChannel(
                name, "slack", url, slack_blocks, http, _retry(config)
            )
        elif isinstance(config, TeamsChannelConfig):
            url = _secret_url(name, config.url_ref)
            channels[name] = JsonWebhookChannel(
                name, "teams", url, adaptive_card, http, _retry(config)
            )
        elif isinstance(config, EmailChannelConfig):
            channels[name] = EmailChannel(
                name,
                host=config.host,
                port=config.port,
                security=config.security,
                sender=config.sender,
                to=tuple(config.to),
                to_recipients=config.to_recipients,
                username=config.username,
                password=resolve_secret_reference(config.password_ref)
                if config.password_ref
                else None,
                ca_file=str(config.ca_file) if config.ca_file else None,
                retry=_retry(config),
            )
        else:  # pragma: no cover - the settings union is closed
            raise ValueError(f"notifications.channels.{name}: unknown kind")
    return channels
