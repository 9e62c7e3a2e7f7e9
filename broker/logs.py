"""Operational logs: one JSON object per line on standard error, each carrying the request id.

The audit trail (`broker.audit`) is the record of decisions; these logs are for operators. Both
follow one rule: no token, secret or credential value is ever written. Code never logs one on
purpose, and as a second line of defence `redact` masks anything in a message that looks like a
JWT, a SAML message or an ``Authorization`` header value before it is formatted.

Every line has ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` and, when the line was
written while serving a request, ``request_id`` (the broker's own id: the same as the
response's ``X-Request-Id`` and the request's audit record; a caller's own well-formed
``X-Request-Id`` goes apart, as ``client_request_id``) and, when tracing is on, ``trace_id``
and ``span_id``. A line written while handling an exception names the exception type only:
exception messages and tracebacks can carry request data.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal, TextIO

request_id_var: ContextVar[str | None] = ContextVar("broker_request_id", default=None)
"""The id of the request being served (set by the HTTP edge, read by every log line). Always
the broker's own: a caller cannot choose what its request is filed under."""

client_request_id_var: ContextVar[str | None] = ContextVar("broker_client_request_id", default=None)
"""The caller's own ``X-Request-Id``, when it sent a well-formed one: recorded apart from the
broker's id, as ``client_request_id`` (in decision records and log lines)."""

_CLIENT_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,64}$")


def new_request_id() -> str:
    """The broker's own id for a request (returned in ``X-Request-Id``): 128 random bits as 32
    hex digits (the shape ``uuid4().hex`` had, at a third of its cost)."""
    return secrets.token_hex(16)


def client_request_id(value: str | None) -> str | None:
    """A caller-supplied request id, if well formed: 1-64 visible ASCII characters (no space,
    no control character, nothing beyond ASCII). Anything else is dropped, never recorded."""
    if value and _CLIENT_REQUEST_ID.match(value):
        return value
    return None


LogFormat = Literal["json", "text"]

_REDACTIONS = (
    # A JWS/JWT in compact form: three base64url parts, the first a JSON header ('eyJ').
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"), "[redacted-jwt]"),
    # Authorization header values and the like.
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 [redacted]"),
    # A base64 SAML message ('<samlp:Response' / '<saml:Assertion' / '<?xml' encoded).
    (re.compile(r"(PHNhbWxwOl|PHNhbWw6QX|PD94bWwg)[A-Za-z0-9+/_=-]{16,}"), "[redacted-saml]"),
)
_OURS = "_broker_handler"


def redact(text: str) -> str:
    """`text` with anything that looks like a token or credential header value masked."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def _trace_ids() -> tuple[str, str] | None:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - opentelemetry-api is a dependency
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            line["request_id"] = request_id
            supplied = client_request_id_var.get()
            if supplied:
                line["client_request_id"] = supplied
        ids = _trace_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__
        return json.dumps(line, ensure_ascii=False, default=str)


class RedactingTextFormatter(logging.Formatter):
    """Plain text for a terminal: ``LEVEL logger [request id] message``, redacted likewise."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        prefix = f"{record.levelname} {record.name}" + (f" [{request_id}]" if request_id else "")
        text = f"{prefix} {redact(record.getMessage())}"
        if record.exc_info and record.exc_info[0] is not None:
            text += f" ({record.exc_info[0].__name__})"
        return text


QUIET_HTTP_LOGGERS = ("httpx", "httpcore")


def configure_logging(
    level: str = "INFO", log_format: LogFormat = "json", stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record (uvicorn's included) through one formatter on standard error.

    Idempotent: a handler installed by an earlier call is replaced, never duplicated. SDK loggers
    that can print request or response bodies at DEBUG (hvac, botocore, urllib3) are held at
    WARNING by the secret backends themselves.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else RedactingTextFormatter())
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _OURS, False):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    for name in QUIET_HTTP_LOGGERS:
        # httpx logs every request's full URL at INFO: a Slack or Teams webhook URL is a
        # secret, and a URL may carry credentials. The broker logs its own calls' outcomes.
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler
