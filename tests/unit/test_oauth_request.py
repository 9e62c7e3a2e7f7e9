"""Reading OAuth form bodies: content type, size cap, duplicates, repeatable parameters."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from broker.errors import InvalidRequest, RequestTooLarge, UnsupportedMediaType
from broker.oauth_request import (
    MAX_FIELDS,
    json_depth_exceeds,
    parse_form_pairs,
    read_form,
    read_form_or_json,
)


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


_FORM_ALPHABET = st.sampled_from(
    [*"ab=&+%2F0fZé ~.-_", "%zz", "%C3%A9", "%ff", "%", "&scope=", "&audience=", "%3A"]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_FORM_ALPHABET, max_size=40).map("".join))
def test_the_form_parser_parses_exactly_as_strict_parse_qsl(text: str) -> None:
    """The broker's form parser is `parse_qsl` (strict, blank values kept, at most MAX_FIELDS
    fields), only cheaper: same pairs for every input, an error wherever it raises."""
    try:
        expected: list[tuple[str, str]] | None = parse_qsl(
            text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=MAX_FIELDS
        )
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(ValueError):
            parse_form_pairs(text)
    else:
        assert parse_form_pairs(text) == expected


def test_the_form_parser_refuses_more_than_max_fields_as_parse_qsl_does() -> None:
    at_limit = "&".join(f"f{i}=v" for i in range(MAX_FIELDS))
    assert len(parse_form_pairs(at_limit)) == MAX_FIELDS
    with pytest.raises(ValueError):
        parse_form_pairs(at_limit + "&one=more")


def test_only_public_parameter_values_are_remembered_decoded() -> None:
    from broker.oauth_request import _unquote_remembered

    _unquote_remembered.cache_clear()
    secretish = "client_secret=s%2Bx&subject_token=a%2Bb&client_assertion=c%2Bd&x%2By=z%2Bz"
    assert parse_form_pairs(secretish) == parse_qsl(secretish, strict_parsing=True)
    assert _unquote_remembered.cache_info().currsize == 0  # never kept
    public = "scope=a%3Ab+c&audience=https%3A%2F%2Fx&grant_type=urn%3Ax"
    for _ in range(3):
        assert parse_form_pairs(public) == parse_qsl(public, strict_parsing=True)
    info = _unquote_remembered.cache_info()
    assert info.currsize == 3 and info.hits == 6
