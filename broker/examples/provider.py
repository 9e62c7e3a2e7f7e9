"""A stand-in LLM provider that accepts only the current API key.

Real providers revoke a key the moment it is rotated out (or deleted), so a gateway still holding
the old key gets 401 until it picks up the new one. This provider does exactly that: `rotate`
switches it to a new key and the old one is refused from that instant. It answers
``POST /v1/chat/completions`` in OpenAI's shape (a canned reply) and counts accepted and refused
calls, per key generation, so tests can tell which keys were used without keeping any key.

Its 401 body says why without echoing the key that was presented.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

__all__ = ["ProviderStats", "StandInProvider"]

INVALID_KEY_BODY = {
    "error": {
        "message": "Incorrect API key provided: the key is unknown or has been revoked.",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    }
}


@dataclass(frozen=True, slots=True)
class ProviderStats:
    """Counters of the stand-in provider (no keys)."""

    accepted: int
    rejected: int
    generation: int
    """The current key's generation: 1 for the first key, +1 per `StandInProvider.rotate`."""
    accepted_by_generation: Mapping[int, int] = field(default_factory=dict)
    """Accepted calls per key generation."""


class StandInProvider:
    """The provider's state (its one valid key and counters) and its ASGI app. Thread-safe:
    tests rotate from one thread while uvicorn serves from another."""

    def __init__(self, key: str) -> None:
        self._lock = threading.Lock()
        self._key = key.encode()
        self._generation = 1
        self._accepted = 0
        self._rejected = 0
        self._by_generation: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"StandInProvider(generation={self._generation})"

    def rotate(self, new_key: str) -> int:
        """Accept `new_key` only, from now on (the old key is revoked at once); returns the new
        key's generation."""
        with self._lock:
            self._key = new_key.encode()
            self._generation += 1
            return self._generation

    def stats(self) -> ProviderStats:
        with self._lock:
            return ProviderStats(
                accepted=self._accepted,
                rejected=self._rejected,
                generation=self._generation,
                accepted_by_generation=MappingProxyType(dict(self._by_generation)),
            )

    def check(self, authorization: str | None) -> int | None:
        """The generation of the key presented as ``Bearer <key>`` if it is the current key,
        else None; counts the call either way."""
        presented = b""
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer":
                presented = value.strip().encode()
        with self._lock:
            if presented and hmac.compare_digest(presented, self._key):
                self._accepted += 1
                generation = self._generation
                self._by_generation[generation] = self._by_generation.get(generation, 0) + 1
                return generation
            self._rejected += 1
            return None

    def asgi_app(self) -> Starlette:
        async def chat_completions(request: Request) -> JSONResponse:
            generation = self.check(request.headers.get("authorization"))
            if generation is None:
                return JSONResponse(
                    INVALID_KEY_BODY,
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="stand-in-provider"'},
                )
            try:
                body = await request.json()
            except ValueError:
                body = None
            messages = body.get("messages") if isinstance(body, dict) else None
            count = len(messages) if isinstance(messages, list) else 0
            return JSONResponse(
                {
                    "id": f"chatcmpl-standin-{generation}",
                    "object": "chat.completion",
                    "model": body.get("model", "stand-in") if isinstance(body, dict) else "",
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": f"A stand-in reply to {count} message(s).",
                            },
                            "finish_reason": "stop",
                        }
                    ],
                    "key_generation": generation,
                    # OpenAI's usage shape: what the example gateway reports to the broker.
                    "usage": {
                        "prompt_tokens": 12 * count + 8,
                        "completion_tokens": 9,
                        "total_tokens": 12 * count + 17,
                        "prompt_tokens_details": {"cached_tokens": 0},
                    },
                }
            )

        return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])])
