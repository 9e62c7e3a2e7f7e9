"""The plug-in point for identity input: an adapter turns a presented token into a `Principal`.

Adapters translate their libraries' exceptions (PyJWT, httpx, python3-saml) at this edge into the
two errors below; nothing above an adapter sees a third-party exception.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from broker.types import Principal, TokenType


class IdentityError(Exception):
    """Base of the errors an identity adapter raises.

    ``reason`` is public: short, safe to show the caller and to write to the audit trail (it never
    contains the token or any part of it). ``debug`` is private detail for operators' logs.
    """

    def __init__(self, reason: str, *, debug: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.debug = debug


class TokenRejected(IdentityError):
    """The token is not acceptable: bad signature, wrong issuer, expired, wrong type, ..."""


class IdentityProviderUnavailable(IdentityError):
    """The token cannot be checked right now (discovery or JWKS unreachable). Fail closed."""


@runtime_checkable
class IdentityAdapter(Protocol):
    """Verifies tokens from one configured identity provider."""

    @property
    def name(self) -> str:
        """The configured IdP name; becomes `Principal.idp`."""
        ...

    @property
    def issuer(self) -> str:
        """The exact issuer identifier this adapter accepts."""
        ...

    def accepts(self, token_type: TokenType) -> bool:
        """Whether this adapter understands tokens of this RFC 8693 type at all."""
        ...

    async def authenticate(self, token: str, token_type: TokenType) -> Principal:
        """Verify `token` presented as `token_type`; raise `TokenRejected` or
        `IdentityProviderUnavailable`."""
        ...
