"""The token endpoint, composed of grant handlers (RFC 6749 §4, §5).

Each grant (token exchange, CIBA, jwt-bearer with an ID-JAG) is a small class with its own
collaborators; `TokenEndpoint` only reads ``grant_type`` and dispatches. A new grant is a new
handler registered in `broker.services.build_services`, not a new branch in a route.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from broker.client_auth import AuthenticatedClient
from broker.dpop import DPoPProof
from broker.errors import InvalidRequest, UnsupportedGrantType
from broker.oauth_request import OAuthForm


class GrantHandler(Protocol):
    """One grant type of the token endpoint."""

    grant_type: str
    """The ``grant_type`` value it answers."""
    repeatable: frozenset[str]
    """Form parameters it accepts more than once (e.g. ``audience``, ``resource``)."""

    async def handle(
        self,
        form: OAuthForm,
        client: AuthenticatedClient | None,
        *,
        request_id: str,
        dpop: DPoPProof | None = None,
    ) -> dict[str, Any]:
        """The token response body, or raise an `OAuthError` (recorded by the handler).
        `dpop`: the request's verified DPoP proof, whose key the issued token is bound to."""
        ...


class TokenEndpoint:
    """``POST /oauth2/token``: dispatch on ``grant_type`` to the registered handler."""

    def __init__(self, grants: Mapping[str, GrantHandler]) -> None:
        self._grants = dict(grants)
        self._supported = ", ".join(sorted(self._grants))

    @property
    def grant_types(self) -> tuple[str, ...]:
        return tuple(sorted(self._grants))

    @property
    def repeatable(self) -> frozenset[str]:
        """Parameters any grant accepts more than once (the form is read before dispatch)."""
        return frozenset().union(*(g.repeatable for g in self._grants.values()))

    async def handle(
        self,
        form: OAuthForm,
        client: AuthenticatedClient | None,
        *,
        request_id: str,
        dpop: DPoPProof | None = None,
    ) -> dict[str, Any]:
        grant_type = form.non_empty("grant_type")
        if grant_type is None:
            raise InvalidRequest("grant_type is required")
        grant = self._grants.get(grant_type)
        if grant is None:
            raise UnsupportedGrantType(f"supported grant types: {self._supported}")
        return await grant.handle(form, client, request_id=request_id, dpop=dpop)
