"""Fetching small JSON documents (discovery, JWKS) from identity providers, failing closed.

Every failure (transport error, timeout, non-200 status, oversized or malformed body) becomes an
`IdentityProviderUnavailable` whose public reason names only what was being fetched; the URL and
the underlying error go to ``debug``.
"""

from __future__ import annotations

from typing import Any

import httpx

from idp_adapters._json import StrictJsonError, loads_strict_object
from idp_adapters.base import IdentityProviderUnavailable

MAX_DOCUMENT_BYTES = 512 * 1024
"""Upper bound on a discovery document or JWKS; anything larger is refused unread."""


async def fetch_json_object(
    http: httpx.AsyncClient,
    url: str,
    *,
    timeout: float,
    what: str,
    max_bytes: int = MAX_DOCUMENT_BYTES,
) -> dict[str, Any]:
    """GET `url` and return its body parsed as a strict JSON object.

    `what` is a short public description ("signing keys", "discovery document") used in reasons.
    Redirects are not followed: identity provider metadata URLs are configured exactly.
    """
    reason = f"identity provider {what} unavailable"
    try:
        async with http.stream(
            "GET",
            url,
            timeout=timeout,
            follow_redirects=False,
            headers={"Accept": "application/json"},
        ) as response:
            if response.status_code != 200:
                raise IdentityProviderUnavailable(
                    reason, debug=f"GET {url} returned HTTP {response.status_code}"
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise IdentityProviderUnavailable(
                    reason, debug=f"GET {url}: body of {declared} bytes exceeds {max_bytes}"
                )
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise IdentityProviderUnavailable(
                        reason, debug=f"GET {url}: body exceeds {max_bytes} bytes"
                    )
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        raise IdentityProviderUnavailable(
            reason, debug=f"GET {url} failed: {type(exc).__name__}: {exc}"
        ) from None
    try:
        return loads_strict_object(bytes(body))
    except StrictJsonError as exc:
        raise IdentityProviderUnavailable(
            reason, debug=f"GET {url}: body is not a strict JSON object ({exc})"
        ) from None
