"""Identity inputs: one module per kind of presented identity (OIDC JWTs, workload JWTs, SAML)."""

from idp_adapters.base import (
    IdentityAdapter,
    IdentityError,
    IdentityProviderUnavailable,
    TokenRejected,
)

__all__ = ["IdentityAdapter", "IdentityError", "IdentityProviderUnavailable", "TokenRejected"]
