"""OpenID Connect discovery (and Kubernetes' service-account issuer discovery, which is the same
document), plus `signing_keys_for`, the one way an adapter gets its `SigningKeyResolver` from an
`IdentityProviderConfig`.

The discovery document is fetched lazily, on the first token, and kept for the life of the
process (only the ``jwks_uri`` is used from it; the keys behind it are refreshed by `JwksCache`).
Its ``issuer`` must equal the configured issuer exactly (OpenID Connect Discovery section 4.3),
and its ``jwks_uri`` must be https unless it is on loopback.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import jwt

from broker.clock import Clock
from broker.settings import IdentityProviderConfig
from broker.urls import require_https_unless_loopback
from idp_adapters._http import fetch_json_object
from idp_adapters.base import IdentityProviderUnavailable
from idp_adapters.jwks import JwksCache, SigningKeyResolver, check_min_refresh_interval

_log = logging.getLogger(__name__)

WELL_KNOWN_PATH = "/.well-known/openid-configuration"


def default_discovery_url(issuer: str) -> str:
    """``<issuer>/.well-known/openid-configuration`` (a trailing ``/`` of the issuer removed)."""
    return issuer.rstrip("/") + WELL_KNOWN_PATH


class OidcDiscovery:
    """The validated discovery document of one issuer, fetched once and shared (single flight).

    After a failed fetch, the next attempt waits `retry_interval` seconds (monotonic clock);
    callers in between get the same `IdentityProviderUnavailable` at once.
    """

    def __init__(
        self,
        issuer: str,
        http: httpx.AsyncClient,
        clock: Clock,
        *,
        discovery_url: str | None = None,
        timeout: float,
        retry_interval: float = 1.0,
    ) -> None:
        self._issuer = issuer
        self._url = discovery_url or default_discovery_url(issuer)
        self._http = http
        self._clock = clock
        self._timeout = timeout
        self._retry_interval = retry_interval
        self._metadata: dict[str, Any] | None = None
        self._failed_at: float | None = None
        self._last_error: IdentityProviderUnavailable | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return self._url

    async def metadata(self) -> dict[str, Any]:
        """The discovery document (validated: exact issuer, acceptable ``jwks_uri``)."""
        if self._metadata is not None:
            return self._metadata
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:
            if self._metadata is not None:
                return self._metadata
            if (
                self._last_error is not None
                and self._failed_at is not None
                and self._clock.monotonic() - self._failed_at < self._retry_interval
            ):
                raise IdentityProviderUnavailable(
                    self._last_error.reason, debug=self._last_error.debug
                )
            try:
                self._metadata = await self._fetch()
            except IdentityProviderUnavailable as exc:
                self._failed_at = self._clock.monotonic()
                self._last_error = exc
                _log.warning("OIDC discovery failed: %s", exc.debug or exc.reason)
                raise
            return self._metadata

    async def jwks_uri(self) -> str:
        """The ``jwks_uri`` from the (validated) discovery document."""
        return str((await self.metadata())["jwks_uri"])

    async def _fetch(self) -> dict[str, Any]:
        document = await fetch_json_object(
            self._http, self._url, timeout=self._timeout, what="discovery document"
        )
        if document.get("issuer") != self._issuer:
            raise IdentityProviderUnavailable(
                "identity provider discovery document names a different issuer",
                debug=f"{self._url}: issuer {document.get('issuer')!r} != {self._issuer!r}",
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise IdentityProviderUnavailable(
                "identity provider discovery document is invalid",
                debug=f"{self._url}: jwks_uri missing or not a string",
            )
        try:
            require_https_unless_loopback(jwks_uri)
        except ValueError as exc:
            raise IdentityProviderUnavailable(
                "identity provider discovery document is invalid", debug=f"{self._url}: {exc}"
            ) from None
        return document


class DiscoveredJwks:
    """A `SigningKeyResolver` whose JWKS location comes from discovery on first use."""

    def __init__(
        self,
        discovery: OidcDiscovery,
        http: httpx.AsyncClient,
        clock: Clock,
        *,
        min_refresh_interval: float,
        max_age: float,
        timeout: float,
    ) -> None:
        self._discovery = discovery
        self._http = http
        self._clock = clock
        self._min_refresh_interval = check_min_refresh_interval(min_refresh_interval)
        self._max_age = max_age
        self._timeout = timeout
        self._cache: JwksCache | None = None

    @property
    def cache(self) -> JwksCache | None:
        """The underlying key cache, once discovery has succeeded."""
        return self._cache

    async def get_signing_key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        if self._cache is None:
            jwks_uri = await self._discovery.jwks_uri()
            if self._cache is None:
                self._cache = JwksCache(
                    jwks_uri,
                    self._http,
                    self._clock,
                    min_refresh_interval=self._min_refresh_interval,
                    max_age=self._max_age,
                    timeout=self._timeout,
                )
        return await self._cache.get_signing_key(kid, alg)


def signing_keys_for(
    config: IdentityProviderConfig, http: httpx.AsyncClient, clock: Clock
) -> SigningKeyResolver:
    """The key resolver for an issuer: its configured ``jwks_uri`` if set (no discovery at all),
    otherwise the ``jwks_uri`` from its discovery document."""
    if config.jwks_uri is not None:
        return JwksCache(
            config.jwks_uri,
            http,
            clock,
            min_refresh_interval=config.jwks_min_refresh_interval_seconds,
            max_age=config.jwks_max_age_seconds,
            timeout=config.http_timeout_seconds,
        )
    discovery = OidcDiscovery(
        config.issuer,
        http,
        clock,
        discovery_url=config.discovery_url,
        timeout=config.http_timeout_seconds,
        retry_interval=min(config.jwks_min_refresh_interval_seconds, 1.0),
    )
    return DiscoveredJwks(
        discovery,
        http,
        clock,
        min_refresh_interval=config.jwks_min_refresh_interval_seconds,
        max_age=config.jwks_max_age_seconds,
        timeout=config.http_timeout_seconds,
    )
