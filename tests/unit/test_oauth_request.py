"""Reading OAuth form bodies: content type, size cap, duplicates, repeatable parameters."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from broker.errors import InvalidRequest, RequestTooLarge, UnsupportedMediaType
from broker.oauth_request import read_form


def _request(
    body: bytes, content_type: str = "application/x-www-form-urlencoded", chunks: int = 1
) -> Request:
    parts = [body[i::chunks] for i in range(chunks)] if chunks > 1 else [body]
    messages = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
        for i, p in enumerate(parts)
    ]

    async def receive() -> dict:
        return messages.pop(0)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-type", content_type.encode())],
    }
    return Request(scope, receive)


def _read(body: bytes, **kwargs: object) -> object:
    content_type = str(kwargs.pop("content_type", "application/x-www-form-urlencoded"))
    return asyncio.run(read_form(_request(body, content_type), max_bytes=100, **kwargs))  # type: ignore[arg-type]


def test_parses_and_keeps_repeatable_parameters() -> None:
    form = _read(b"a=1&audience=x&audience=y&b=", repeatable=frozenset({"audience"}))
    assert form["a"] == "1"  # type: ignore[index]
    assert form.get_all("audience") == ["x", "y"]  # type: ignore[attr-defined]
    assert form.non_empty("b") is None  # type: ignore[attr-defined]


def test_duplicate_single_parameter_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match="more than once"):
        _read(b"grant_type=a&grant_type=b")


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", ""])
def test_wrong_content_type(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        _read(b"a=1", content_type=content_type)


def test_content_type_with_charset_is_accepted() -> None:
    form = _read(b"a=1", content_type="application/x-www-form-urlencoded; charset=UTF-8")
    assert form["a"] == "1"  # type: ignore[index]


def test_oversized_body_is_refused_while_streaming() -> None:
    with pytest.raises(RequestTooLarge):
        _read(b"a=" + b"x" * 200)


@pytest.mark.parametrize("body", [b"\xff\xfe=1", b"a=1&&b", b"=%%%"])
def test_malformed_bodies(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        _read(body)
