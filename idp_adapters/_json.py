"""Strict JSON parsing for security-relevant documents (JOSE headers, JWT payloads, JWKS,
discovery).

``json.loads`` silently keeps the last of duplicate keys, accepts ``NaN``/``Infinity`` and turns
``1e400`` into ``inf``, and guesses UTF-16/32 encodings for bytes. Each of those lets two parsers
disagree about the same document, so here they are all errors.
"""

from __future__ import annotations

import json
import math
from typing import Any


class StrictJsonError(ValueError):
    """The document is not strict JSON. The message never contains the document."""


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):  # a name given twice collapsed into one member
        raise StrictJsonError("duplicate member name")
    return result


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJsonError("non-finite number")
    return value


def _reject_constant(name: str) -> Any:
    raise StrictJsonError("NaN and Infinity are not JSON")


_STRICT_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates,
    parse_float=_finite_float,
    parse_constant=_reject_constant,
)
"""What ``json.loads`` with these hooks builds for every call; decoding keeps no state."""


def loads_strict(data: bytes | str) -> Any:
    """Parse UTF-8 JSON, rejecting duplicate member names (at any depth) and non-finite numbers."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return _STRICT_DECODER.decode(text)
    except StrictJsonError:
        raise
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        # JSONDecodeError is a ValueError; its message holds a position, not content.
        raise StrictJsonError(f"invalid JSON ({type(exc).__name__})") from None


def loads_strict_object(data: bytes | str) -> dict[str, Any]:
    """Like `loads_strict`, but the top level must be a JSON object."""
    value = loads_strict(data)
    if not isinstance(value, dict):
        raise StrictJsonError("not a JSON object")
    return value
