"""`broker.logs`: JSON lines with request ids, redaction of token-shaped text, exception types
only, and one handler however often logging is configured."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator

import pytest

from broker.logs import configure_logging, redact, request_id_var

JWT = (
    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0"
    ".eyJzdWIiOiJhbGljZSIsImlzcyI6Imh0dHBzOi8vaWRwIn0"
    ".c2lnbmF0dXJlLWJ5dGVzLWhlcmUtYW5kLW1vcmU"
)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    handler = configure_logging("DEBUG", "json", stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_line_is_json_with_the_request_id_of_its_context(captured: io.StringIO) -> None:
    log = logging.getLogger("broker.http")
    log.info("outside any request")
    token = request_id_var.set("req-42")
    try:
        log.warning("inside %s", "a request")
    finally:
        request_id_var.reset(token)
    first, second = _lines(captured)
    assert first["message"] == "outside any request" and "request_id" not in first
    assert second == {
        "time": second["time"],
        "level": "WARNING",
        "logger": "broker.http",
        "message": "inside a request",
        "request_id": "req-42",
    }
    assert str(second["time"]).endswith("+00:00")


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"subject token {JWT} refused", JWT),
        ("Authorization: Bearer abcdefghijklmnop0123", "abcdefghijklmnop0123"),
        ("header basic dHJpYWdlLWFnZW50OnNlY3JldA==", "dHJpYWdlLWFnZW50OnNlY3JldA=="),
        (
            "saml " + base64.b64encode(b"<samlp:Response ID='x'>" + b"a" * 40).decode(),
            base64.b64encode(b"<samlp:Response ID='x'>" + b"a" * 40).decode()[:24],
        ),
    ],
)
def test_token_shaped_text_is_masked(text: str, secret: str) -> None:
    assert secret not in redact(text)
    assert "redacted" in redact(text)


def test_redaction_leaves_ordinary_text_alone() -> None:
    text = "credential openai-api-key version 7 served to llm-gateway for dev/alice"
    assert redact(text) == text


def test_exceptions_are_named_not_printed(captured: io.StringIO) -> None:
    try:
        raise ValueError("sk-live-canary-value in the message")
    except ValueError:
        logging.getLogger("broker.cache").exception("refresh failed")
    (line,) = _lines(captured)
    assert line["exception"] == "ValueError"
    assert "sk-live-canary" not in captured.getvalue()
    assert "Traceback" not in captured.getvalue()


def test_configuring_twice_keeps_one_handler(captured: io.StringIO) -> None:
    second = io.StringIO()
    handler = configure_logging("INFO", "text", second)
    try:
        logging.getLogger("broker.policy").info("reloaded %s", JWT)
        logging.getLogger("broker.policy").debug("not at INFO")
    finally:
        logging.getLogger().removeHandler(handler)
    assert captured.getvalue() == ""  # the first handler was replaced, not kept
    assert second.getvalue() == "INFO broker.policy reloaded [redacted-jwt]\n"


def test_uvicorn_loggers_go_through_the_same_handler(captured: io.StringIO) -> None:
    logging.getLogger("uvicorn.error").error("worker %d died", 3)
    (line,) = _lines(captured)
    assert line["logger"] == "uvicorn.error" and line["message"] == "worker 3 died"
