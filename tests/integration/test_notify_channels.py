"""Notification channels against real local receivers: a loopback HTTP server that checks the
webhook signature (and fails on purpose, to see retries), Slack and Teams receivers checking
the body's shape, an SMTP server (aiosmtpd) speaking STARTTLS with a certificate made here, and
channels that are down. No channel secret reaches a record or a log line."""

from __future__ import annotations

import asyncio
import datetime
import hmac
import io
import ipaddress
import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from broker.audit import DecisionLog, MemorySink
from broker.clock import SystemClock
from broker.logs import configure_logging
from broker.notify import Notification, Notifier, build_channels, signature
from broker.notify.email import EmailChannel
from broker.notify.http import RetryPolicy
from broker.settings import NotificationSettings
from broker.types import Sensitive
from idp_adapters._loopback import serve_in_thread

pytestmark = pytest.mark.anyio

HMAC_SECRET = "whsec-" + os.urandom(8).hex()
SLACK_PATH = "/services/T000/B000/" + os.urandom(6).hex()  # a Slack URL is itself a secret
SMTP_PASSWORD = "smtp-" + os.urandom(6).hex()
NOTE = Notification(
    event="approval.requested",
    title="Approval needed: tickets:refund for dev/dave",
    text="triage-agent asks to use tickets:refund for dev/dave. <@channel> & co",
    url="http://127.0.0.1:8080/approvals/apr_0123",
    fields=(("Person", "dev/dave"), ("Message", "Refund 120 EUR on order 4711")),
    idempotency_key="approval.requested:apr_0123",
)


@dataclass
class Receiver:
    url: str
    bodies: dict[str, list[tuple[dict[str, str], bytes]]] = field(default_factory=dict)
    fail_first: dict[str, int] = field(default_factory=dict)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver("")

    async def record(request: Request) -> JSONResponse:
        path = request.url.path
        state.bodies.setdefault(path, []).append((dict(request.headers), await request.body()))
        if state.fail_first.get(path, 0) > 0:
            state.fail_first[path] -= 1
            return JSONResponse({"error": "busy"}, status_code=500)
        if path == "/reject":
            return JSONResponse({"error": "no"}, status_code=400)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/{path:path}", record, methods=["POST"])])
    server = serve_in_thread(app)
    try:
        state.url = server.url
        yield state
    finally:
        server.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def notifier_for(channels: dict[str, Any], http: httpx.AsyncClient) -> tuple[Notifier, MemorySink]:
    sink = MemorySink()
    settings = NotificationSettings.model_validate({"channels": channels})
    built = build_channels(settings.channels, http)
    for channel in built.values():  # fast retries for the test
        retry = getattr(channel, "_retry", None)
        if isinstance(retry, RetryPolicy):
            retry.base_delay = 0.01
    return Notifier(built, DecisionLog([sink], SystemClock())), sink


def outcomes(sink: MemorySink) -> dict[str, dict[str, Any]]:
    return {r["channel"]: r for r in sink.records if r["event"].startswith("notification.")}


async def test_webhook_signed_retried_and_one_channel_down_never_blocks_another(
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    root_level = logging.getLogger().level
    handler = configure_logging("DEBUG", "text", io.StringIO())  # the broker's own setup
    request.addfinalizer(lambda: logging.getLogger().removeHandler(handler))
    request.addfinalizer(lambda: logging.getLogger().setLevel(root_level))
    caplog.set_level(logging.DEBUG, logger="broker")
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)  # it logs full URLs
    monkeypatch.setenv("HOOK_SECRET", HMAC_SECRET)
    monkeypatch.setenv("SLACK_URL", receiver.url + SLACK_PATH)
    monkeypatch.setenv("TEAMS_URL", receiver.url + "/teams")
    receiver.fail_first["/hook"] = 2
    async with httpx.AsyncClient() as http:
        notifier, sink = notifier_for(
            {
                "hook": {
                    "kind": "webhook",
                    "url": receiver.url + "/hook",
                    "secret_ref": "env:HOOK_SECRET",
                },
                "down": {
                    "kind": "webhook",
                    "url": f"http://127.0.0.1:{closed_port()}/x",
                    "secret_ref": "env:HOOK_SECRET",
                    "max_attempts": 2,
                },
                "refusing": {
                    "kind": "webhook",
                    "url": receiver.url + "/reject",
                    "secret_ref": "env:HOOK_SECRET",
                },
                "slack": {"kind": "slack", "url_ref": "env:SLACK_URL"},
                "teams": {"kind": "teams", "url_ref": "env:TEAMS_URL"},
            },
            http,
        )
        notifier.notify(["hook", "down", "refusing", "slack", "teams", "nowhere"], NOTE)
        await notifier.drain()

    results = outcomes(sink)
    assert results["hook"]["outcome"] == "delivered" and results["hook"]["attempts"] == 3
    assert results["down"]["outcome"] == "failed" and results["down"]["reason"] == "unreachable"
    assert results["down"]["attempts"] == 2
    assert results["refusing"]["reason"] == "http_400" and results["refusing"]["attempts"] == 1
    assert results["nowhere"]["reason"] == "unknown_channel"
    assert results["slack"]["outcome"] == results["teams"]["outcome"] == "delivered"

    deliveries = receiver.bodies["/hook"]
    assert len(deliveries) == 3
    assert len({headers["idempotency-key"] for headers, _ in deliveries}) == 1
    for headers, body in deliveries:  # what a receiver checks before trusting a webhook
        expected = signature(HMAC_SECRET.encode(), headers["x-broker-timestamp"], body)
        assert hmac.compare_digest(headers["x-broker-signature"], expected)
        assert json.loads(body)["url"] == NOTE.url
    forged = signature(b"wrong", deliveries[0][0]["x-broker-timestamp"], deliveries[0][1])
    assert forged != deliveries[0][0]["x-broker-signature"]

    slack = json.loads(receiver.bodies[SLACK_PATH][0][1])
    kinds = [block["type"] for block in slack["blocks"]]
    assert kinds == ["header", "section", "section", "actions", "context"]
    assert slack["blocks"][3]["elements"][0]["url"] == NOTE.url
    assert "<@channel>" not in json.dumps(slack)  # Slack's control characters escaped
    teams = json.loads(receiver.bodies["/teams"][0][1])
    card = teams["attachments"][0]
    assert card["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert card["content"]["type"] == "AdaptiveCard" and card["content"]["version"] == "1.4"
    assert card["content"]["actions"][0] == {
        "type": "Action.OpenUrl",
        "title": "Open",
        "url": NOTE.url,
    }
    assert card["content"]["body"][2]["type"] == "FactSet"

    leaked = json.dumps(sink.records) + caplog.text
    for secret in (HMAC_SECRET, SLACK_PATH, receiver.url + "/teams"):
        assert secret not in leaked


def _certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtp.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "smtp.pem", directory / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


async def test_email_over_starttls_and_an_smtp_server_that_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ssl

    caplog.set_level(logging.DEBUG)
    cert, key = _certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    mailbox = Mailbox()
    port = closed_port()
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        auth_require_tls=True,
        authenticator=lambda *args: _accept(mailbox, *args),
    )
    controller.start()
    try:
        monkeypatch.setenv("SMTP_PASSWORD", SMTP_PASSWORD)
        async with httpx.AsyncClient() as http:
            notifier, sink = notifier_for(
                {
                    "mail": {
                        "kind": "email",
                        "host": "127.0.0.1",
                        "port": port,
                        "sender": "broker@example.com",
                        "to": ["approvers@example.com"],
                        "username": "broker",
                        "password_ref": "env:SMTP_PASSWORD",
                        "ca_file": str(cert),
                    },
                    "mail-down": {
                        "kind": "email",
                        "host": "127.0.0.1",
                        "port": closed_port(),
                        "sender": "broker@example.com",
                        "to": ["x@example.com"],
                        "max_attempts": 2,
                    },
                },
                http,
            )
            notifier.notify(["mail", "mail-down"], NOTE)
            await notifier.drain()
    finally:
        controller.stop()

    results = outcomes(sink)
    assert results["mail"]["outcome"] == "delivered", results
    assert results["mail-down"]["outcome"] == "failed"
    assert results["mail-down"]["reason"] == "unreachable"
    [(sender, recipients, content)] = mailbox.messages
    assert sender == "broker@example.com" and recipients == ["approvers@example.com"]
    text = content.decode()
    assert "Subject: Approval needed: tickets:refund for dev/dave" in text
    assert NOTE.url in text and "text/html" in text
    assert "&lt;@channel&gt;" in text  # the HTML alternative is escaped
    assert mailbox.logins == [(b"broker", SMTP_PASSWORD.encode())]
    assert SMTP_PASSWORD not in json.dumps(sink.records) + caplog.text


def _accept(
    mailbox: Mailbox, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> Any:
    from aiosmtpd.smtp import AuthResult, LoginPassword

    if isinstance(auth_data, LoginPassword):
        mailbox.logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=True)
    return AuthResult(success=False, handled=False)


async def test_email_refuses_a_relay_whose_certificate_it_cannot_verify(tmp_path: Path) -> None:
    import ssl

    cert, key = _certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    mailbox = Mailbox()
    port = closed_port()
    controller = Controller(
        mailbox, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True
    )
    controller.start()
    try:
        channel = EmailChannel(
            "mail",
            host="127.0.0.1",
            port=port,
            security="starttls",
            sender="broker@example.com",
            to=("a@example.com",),
            retry=RetryPolicy(max_attempts=1),
        )
        with pytest.raises(Exception) as failed:
            await channel.send(NOTE)
        assert getattr(failed.value, "reason", None) == "unreachable"
    finally:
        controller.stop()
    assert mailbox.messages == []


def test_settings_refuse_plain_http_and_plain_smtp_off_loopback() -> None:
    from pydantic import ValidationError

    for bad in (
        {"kind": "webhook", "url": "http://hooks.example.com/x", "secret_ref": "env:X"},
        {
            "kind": "email",
            "host": "smtp.example.com",
            "security": "none",
            "sender": "b@example.com",
            "to": ["a@example.com"],
        },
        {"kind": "email", "host": "127.0.0.1", "sender": "b@example.com"},
        {"kind": "pager", "url": "https://x"},
    ):
        with pytest.raises(ValidationError):
            NotificationSettings.model_validate({"channels": {"c": bad}})


async def test_unread_secret_reference_fails_at_build_not_at_send() -> None:
    from secret_backends.config import SecretAccessDenied

    settings = NotificationSettings.model_validate(
        {"channels": {"s": {"kind": "slack", "url_ref": "env:NOT_SET_ANYWHERE_123"}}}
    )
    async with httpx.AsyncClient() as http:
        with pytest.raises(SecretAccessDenied):
            build_channels(settings.channels, http)
    assert Sensitive("x").reveal() == "x"
    await asyncio.sleep(0)
