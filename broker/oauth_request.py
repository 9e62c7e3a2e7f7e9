"""Reading an OAuth request body safely: size cap, content type, duplicate parameters.

RFC 6749 §3.2 (and RFC 7662 §2.1, RFC 7009 §2.1): parameters are sent as
``application/x-www-form-urlencoded`` and must not appear more than once, except where a
specification allows repetition (RFC 8693 ``audience``, RFC 8707 ``resource``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote

from starlette.requests import Request

from broker.errors import InvalidRequest, RequestTooLarge, UnsupportedMediaType

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
JSON_CONTENT_TYPE = "application/json"
MAX_FIELDS = 64
MAX_JSON_DEPTH = 32
"""Deeper JSON is refused before it is parsed: ``json.loads`` recurses once per level, so
``[`` x 5000 would exhaust the interpreter's recursion limit (a 500) instead of a 400."""


class OAuthForm(Mapping[str, str]):
    """Single-valued parameters by name, plus `get_all` for the repeatable ones."""

    def __init__(self, pairs: list[tuple[str, str]], repeatable: frozenset[str]) -> None:
        self._single: dict[str, str] = {}
        self._multi: dict[str, list[str]] = {}
        for name, value in pairs:
            if not name:
                raise InvalidRequest("the request body has a parameter without a name")
            if name in repeatable:
                self._multi.setdefault(name, []).append(value)
                continue
            if name in self._single:
                raise InvalidRequest(f"parameter {name!r} is included more than once")
            self._single[name] = value

    def __getitem__(self, name: str) -> str:
        return self._single[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._single)

    def __len__(self) -> int:
        return len(self._single)

    def __contains__(self, name: object) -> bool:
        return name in self._single

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        # The ABC's get raises and catches KeyError for every absent parameter.
        return self._single.get(name, default)

    def get_all(self, name: str) -> list[str]:
        return list(self._multi.get(name, ()))

    def non_empty(self, name: str) -> str | None:
        """The parameter's value, treating an empty value as absent (RFC 6749 §3.1)."""
        value = self._single.get(name)
        return value if value else None


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise RequestTooLarge(f"the request body exceeds {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise RequestTooLarge(f"the request body exceeds {max_bytes} bytes")
    return bytes(body)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _form_component(text: str, *, public: bool = False) -> str:
    if "%" not in text and "+" not in text:  # most names and values, JWTs included
        return text
    if public and len(text) <= _REMEMBERED_COMPONENT_CHARS:
        return _unquote_remembered(text)
    return unquote(text.replace("+", " "), errors="replace")


_PUBLIC_PARAMETERS = frozenset(
    {
        "grant_type",
        "subject_token_type",
        "actor_token_type",
        "requested_token_type",
        "client_assertion_type",
        "token_type_hint",
        "scope",
        "audience",
        "resource",
    }
)
"""Parameters whose values are never secret and recur from request to request."""
_REMEMBERED_COMPONENT_CHARS = 256


@functools.lru_cache(maxsize=1024)
def _unquote_remembered(text: str) -> str:
    """A short encoded value of a public parameter (``urn%3Aietf%3Aparams%3A...``, scopes,
    audiences), decoded once: a pure function of its argument, bounded in entries and size.
    Names, and values that may be secret (tokens, assertions, secrets), are never kept."""
    return unquote(text.replace("+", " "), errors="replace")


def parse_form_pairs(text: str) -> list[tuple[str, str]]:
    """``application/x-www-form-urlencoded`` as ``urllib.parse.parse_qsl(text,
    keep_blank_values=True, strict_parsing=True, max_num_fields=MAX_FIELDS)`` parses it (an
    empty body: no pairs), a third of the cost on a token request (most parts need no
    unquoting). Raises ``ValueError``, naming no part, for a part without ``=`` or too many
    parts."""
    if not text:
        return []
    parts = text.split("&")
    if len(parts) > MAX_FIELDS:
        raise ValueError("Max number of fields exceeded")
    pairs: list[tuple[str, str]] = []
    for part in parts:
        name, equals, value = part.partition("=")
        if not equals:
            raise ValueError("a part without '='")  # never the part: it may hold a secret
        name = _form_component(name)
        pairs.append((name, _form_component(value, public=name in _PUBLIC_PARAMETERS)))
    return pairs


def _parse_form(body: bytes, repeatable: frozenset[str]) -> OAuthForm:
    try:
        pairs = parse_form_pairs(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None
    except ValueError:
        raise InvalidRequest("the request body is not a well-formed form") from None
    return OAuthForm(pairs, repeatable)


async def read_form(
    request: Request, *, max_bytes: int, repeatable: frozenset[str] = frozenset()
) -> OAuthForm:
    if _media_type(request) != FORM_CONTENT_TYPE:
        raise UnsupportedMediaType(f"the request body must be {FORM_CONTENT_TYPE}")
    return _parse_form(await _read_body(request, max_bytes), repeatable)


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `body` nests arrays or objects deeper than `limit` (brackets inside strings do
    not count). Linear in the body, no recursion; a body with few brackets is not scanned."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


async def read_form_or_json(request: Request, *, max_bytes: int) -> OAuthForm:
    """A form body, or a JSON object of string members (as gateways often send, RFC 7662 style).
    An empty body gives an empty form."""
    media_type = _media_type(request)
    body = await _read_body(request, max_bytes)
    if media_type == FORM_CONTENT_TYPE or not body:
        return _parse_form(body, frozenset())
    if media_type != JSON_CONTENT_TYPE:
        raise UnsupportedMediaType(
            f"the request body must be {FORM_CONTENT_TYPE} or {JSON_CONTENT_TYPE}"
        )
    if json_depth_exceeds(body):
        raise InvalidRequest(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels")
    try:
        # Objects become lists of pairs, so a member given twice is caught like a repeated form
        # parameter instead of silently keeping the last one.
        pairs = json.loads(body, object_pairs_hook=list)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidRequest("the request body is not well-formed JSON") from None
    if not isinstance(pairs, list) or not body.lstrip().startswith(b"{"):
        raise InvalidRequest("the request body must be a JSON object")
    if len(pairs) > MAX_FIELDS or not all(isinstance(v, str) for _, v in pairs):
        raise InvalidRequest("every member of the request body must be a string")
    return OAuthForm(pairs, frozenset())


class JsonDocument(OAuthForm):
    """A JSON object body (the broker's own APIs that take structured documents, such as usage
    reports): `document` is the whole object; its string members are also the form's, so
    client authentication reads them as for any other body."""

    def __init__(self, document: dict[str, object]) -> None:
        super().__init__([(k, v) for k, v in document.items() if isinstance(v, str)], frozenset())
        self.document = document


async def read_json_document(request: Request, *, max_bytes: int) -> JsonDocument:
    """A JSON object body, strictly: no duplicate members, no NaN or infinities, at most
    `MAX_JSON_DEPTH` levels."""
    from idp_adapters._json import StrictJsonError, loads_strict_object

    if _media_type(request) != JSON_CONTENT_TYPE:
        raise UnsupportedMediaType(f"the request body must be {JSON_CONTENT_TYPE}")
    body = await _read_body(request, max_bytes)
    if json_depth_exceeds(body):
        raise InvalidRequest(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels")
    try:
        return JsonDocument(loads_strict_object(body))
    except (StrictJsonError, UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidRequest("the request body must be one well-formed JSON object") from None
