"""Reading an OAuth request body safely: size cap, content type, duplicate parameters.

RFC 6749 §3.2 (and RFC 7662 §2.1, RFC 7009 §2.1): parameters are sent as
``application/x-www-form-urlencoded`` and must not appear more than once, except where a
specification allows repetition (RFC 8693 ``audience``, RFC 8707 ``resource``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from urllib.parse import parse_qsl

from starlette.requests import Request

from broker.errors import InvalidRequest, RequestTooLarge, UnsupportedMediaType

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
MAX_FIELDS = 64


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

    def get_all(self, name: str) -> list[str]:
        return list(self._multi.get(name, ()))

    def non_empty(self, name: str) -> str | None:
        """The parameter's value, treating an empty value as absent (RFC 6749 §3.1)."""
        value = self._single.get(name)
        return value if value else None


async def read_form(
    request: Request, *, max_bytes: int, repeatable: frozenset[str] = frozenset()
) -> OAuthForm:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM_CONTENT_TYPE:
        raise UnsupportedMediaType(f"the request body must be {FORM_CONTENT_TYPE}")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise RequestTooLarge(f"the request body exceeds {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise RequestTooLarge(f"the request body exceeds {max_bytes} bytes")
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(
            text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=MAX_FIELDS
        )
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None
    except ValueError:
        raise InvalidRequest("the request body is not a well-formed form") from None
    return OAuthForm(pairs, repeatable)
