"""Reading OAuth form bodies: content type, size cap, duplicates, repeatable parameters."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from broker.errors import InvalidRequest, RequestTooLarge, UnsupportedMediaType
from broker.oauth_request import json_depth_exceeds, read_form, read_form_or_json


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


@pytest.mark.parametrize(
    "body",
    [b"[" * 5000, b'{"a":' * 5000, b'{"a":' + b"[" * 33 + b"]" * 33 + b"}", b"[" * 100_000],
)
def test_deeply_nested_json_is_refused_before_parsing(body: bytes) -> None:
    with pytest.raises(InvalidRequest, match="deeper than 32"):
        asyncio.run(read_form_or_json(_request(body, "application/json"), max_bytes=1 << 20))


def test_brackets_inside_json_strings_do_not_count_as_depth() -> None:
    body = b'{"token": "' + b"[{" * 200 + b'\\"]"}'
    assert not json_depth_exceeds(body)
    form = asyncio.run(read_form_or_json(_request(body, "application/json"), max_bytes=1 << 20))
    assert form["token"].startswith("[{[{")
    assert json_depth_exceeds(b"[" * 33) and not json_depth_exceeds(b"[" * 32 + b"]" * 32)
