"""URL rules shared by every configuration model (no dependencies, so anything may import it)."""

from __future__ import annotations

from urllib.parse import urlsplit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def is_loopback_url(url: str) -> bool:
    return (urlsplit(url).hostname or "") in LOOPBACK_HOSTS


def require_https_unless_loopback(url: str) -> str:
    """`url` itself when it is https, or plain http on loopback; otherwise ValueError."""
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback_url(url)):
        return url
    # Name the host only: a URL may carry credentials, which must not reach an error message.
    raise ValueError(
        f"the URL for host {parts.hostname or '?'!r} must use https "
        "(plain http is allowed only on loopback)"
    )
