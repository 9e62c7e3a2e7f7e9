"""E-mail through SMTP (aiosmtplib): STARTTLS by default, or implicit TLS; plain SMTP only to a
loopback relay. A text body and an HTML alternative (jinja2, autoescaped); the ``Message-ID`` is
derived from the idempotency key, so a retried delivery is recognisably the same message."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from email.message import EmailMessage
from typing import Literal

import aiosmtplib
from jinja2 import Environment, select_autoescape

from broker.notify.base import DeliveryFailed, Notification
from broker.notify.http import RetryPolicy
from broker.types import Sensitive

Security = Literal["starttls", "tls", "none"]

_HTML = Environment(autoescape=select_autoescape(default=True)).from_string(
    """<!doctype html><html><body>
<h2>{{ n.title }}</h2>
<p>{{ n.text }}</p>
{% if n.fields %}<table>{% for name, value in n.fields %}
<tr><th align="left">{{ name }}</th><td>{{ value }}</td></tr>{% endfor %}
</table>{% endif %}
{% if n.url %}<p><a href="{{ n.url }}">Open</a></p>{% endif %}
</body></html>"""
)


def build_message(notification: Notification, sender: str, to: tuple[str, ...]) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = notification.title[:200]
    message["From"] = sender
    message["To"] = ", ".join(to)
    digest = hashlib.sha256(notification.idempotency_key.encode()).hexdigest()[:32]
    domain = sender.rpartition("@")[2] or "broker.invalid"
    message["Message-ID"] = f"<{digest}@{domain}>"
    lines = [notification.text, ""]
    lines += [f"{name}: {value}" for name, value in notification.fields]
    if notification.url:
        lines += ["", notification.url]
    message.set_content("\n".join(lines))
    message.add_alternative(_HTML.render(n=notification), subtype="html")
    return message


class EmailChannel:
    kind = "email"

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int,
        security: Security,
        sender: str,
        to: tuple[str, ...],
        to_recipients: bool = False,
        username: str | None = None,
        password: Sensitive | None = None,
        ca_file: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.name = name
        self._host = host
        self._port = port
        self._security = security
        self._sender = sender
        self._to = to
        self._to_recipients = to_recipients
        self._username = username
        self._password = password
        self._ca_file = ca_file
        self._retry = retry or RetryPolicy()

    def _tls(self) -> ssl.SSLContext | None:
        if self._security == "none":
            return None
        return ssl.create_default_context(cafile=self._ca_file)

    async def send(self, notification: Notification) -> int:
        recipients = self._to
        if self._to_recipients:
            recipients = tuple(dict.fromkeys((*self._to, *notification.recipients)))
        if not recipients:
            raise DeliveryFailed("no_recipients", 0)
        message = build_message(notification, self._sender, recipients)
        reason = "unreachable"
        for attempt in range(1, self._retry.max_attempts + 1):
            try:
                await aiosmtplib.send(
                    message,
                    hostname=self._host,
                    port=self._port,
                    start_tls=self._security == "starttls",
                    use_tls=self._security == "tls",
                    tls_context=self._tls(),
                    username=self._username,
                    password=self._password.reveal() if self._password else None,
                    timeout=self._retry.timeout,
                )
                return attempt
            except aiosmtplib.SMTPResponseException as exc:
                reason = f"smtp_{exc.code}"
                if 500 <= exc.code < 600:  # permanent: the server will not take it
                    raise DeliveryFailed(reason, attempt) from None
            except aiosmtplib.SMTPTimeoutError:
                reason = "timeout"
            except (aiosmtplib.SMTPException, OSError, ssl.SSLError):
                reason = "unreachable"
            if attempt < self._retry.max_attempts:
                await asyncio.sleep(self._retry.delay(attempt))
        raise DeliveryFailed(reason, self._retry.max_attempts)
