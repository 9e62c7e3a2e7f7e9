"""Where the broker asks for DPoP (RFC 9449) proofs, and what each one must prove.

* Token endpoint, every grant: a ``DPoP`` header binds the issued token to the proof's key
  (``cnf.jkt``, ``token_type: DPoP``). An agent whose policy says ``dpop: required`` gets
  nothing without one.
* Re-exchange of a bound token: the sub-agent presents the parent token with a proof by the
  parent's key in ``subject_token_dpop`` (made for this endpoint, ``ath`` of the parent token:
  the parent agent hands it over with the token), and binds the child to its own key with its
  ``DPoP`` header. A bound chain never turns into a bearer token.
* Credential fetch with a bound agent token: the gateway forwards the agent's proof (``DPoP``
  header of the fetch), made for the gateway's registered ``url`` (or a path under it), with the
  method the gateway names (``dpop_method``, default POST), the agent token's hash and its key.

Proof ``jti`` values are single use across replicas (the state store).
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.dpop import DPoPError, DPoPProof, DPoPVerifier, UseDPoPNonce, one_header
from broker.errors import (
    DPoPProofRefused,
    InvalidDPoPProof,
    InvalidRequest,
    OAuthError,
    TemporarilyUnavailable,
)
from broker.errors import UseDPoPNonce as UseDPoPNonceError
from broker.oauth_request import OAuthForm
from broker.state import StateUnavailable

SUBJECT_PROOF_PARAMETER = "subject_token_dpop"
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def _state_down() -> TemporarilyUnavailable:
    return TemporarilyUnavailable(
        "DPoP proof replay state cannot be checked right now; refusing (fail closed)",
        reason="state_unavailable",
        headers={"Retry-After": "1"},
    )


def _refusal(exc: DPoPError, *, at_resource: bool = False, what: str = "") -> OAuthError:
    """A `broker.dpop` refusal in OAuth terms (RFC 9449 §5, §7.1, §8)."""
    description = f"{what}{exc.reason}"
    if isinstance(exc, UseDPoPNonce):
        return UseDPoPNonceError(description, nonce=exc.nonce, reason="dpop_nonce_required")
    if at_resource:
        return DPoPProofRefused(description, debug=exc.debug, reason="dpop_proof_invalid")
    return InvalidDPoPProof(description, debug=exc.debug, reason="dpop_proof_invalid")


class TokenBinding:
    """The broker's DPoP checks (see the module docstring)."""

    def __init__(self, verifier: DPoPVerifier, *, token_endpoint: str) -> None:
        self._verifier = verifier
        self._token_endpoint = token_endpoint

    @property
    def algorithms(self) -> list[str]:
        return self._verifier.algorithms

    async def token_request(
        self, headers: Sequence[str], *, url: str | None = None
    ) -> DPoPProof | None:
        """The ``DPoP`` header of a token request (None when there is none)."""
        try:
            proof = one_header(headers)
            if proof is None:
                return None
            return await self._verifier.verify(
                proof, method="POST", url=url or self._token_endpoint
            )
        except DPoPError as exc:
            raise _refusal(exc) from None
        except StateUnavailable:
            raise _state_down() from None

    @staticmethod
    def require(agent: str, required: bool, proof: DPoPProof | None, *, parent_bound: bool) -> None:
        """Refuse a token request that must bind its token and has no proof."""
        if proof is not None:
            return
        if required:
            raise InvalidDPoPProof(
                f"agent {agent!r} must bind its tokens to its key: send a DPoP proof "
                "(RFC 9449) with the request",
                reason="dpop_required",
            )
        if parent_bound:
            raise InvalidDPoPProof(
                "the subject token is bound to a key (DPoP): the token it is exchanged for "
                "must be bound too; send the sub-agent's own DPoP proof",
                reason="dpop_required",
            )

    async def subject(self, form: OAuthForm, subject_token: str, jkt: str, *, url: str) -> None:
        """A bound subject token comes with a proof by its key (``subject_token_dpop``)."""
        proof = form.non_empty(SUBJECT_PROOF_PARAMETER)
        if proof is None:
            raise InvalidDPoPProof(
                f"the subject token is bound to a key (DPoP): {SUBJECT_PROOF_PARAMETER} must "
                "carry a proof by that key for this request (with ath of the subject token)",
                reason="subject_dpop_missing",
            )
        try:
            await self._verifier.verify(
                proof,
                method="POST",
                url=url,
                access_token=subject_token,
                jkt=jkt,
                check_nonce=False,  # the parent agent's proof: made without our nonce
            )
        except DPoPError as exc:
            raise _refusal(exc, what=f"{SUBJECT_PROOF_PARAMETER}: ") from None
        except StateUnavailable:
            raise _state_down() from None

    async def presented(
        self,
        headers: Sequence[str],
        *,
        token: str,
        jkt: str,
        gateway: str,
        gateway_url: str | None,
        method: str | None,
        hinted: bool = False,
    ) -> None:
        """A bound agent token at the credential endpoint: the agent's own proof, forwarded by
        the gateway, made for the gateway. One proof serves one fetch, and one more with a
        rejected-version hint (`hinted`: the provider refused the key just served)."""
        if gateway_url is None:
            raise DPoPProofRefused(
                f"the agent token is bound to a key (DPoP) and gateway {gateway!r} has no "
                "registered url to check the agent's proof against",
                reason="gateway_url_missing",
            )
        htm = (method or "POST").upper()
        if htm not in _METHODS:
            raise InvalidRequest("dpop_method is not an HTTP method")
        try:
            proof = one_header(headers)
            if proof is None:
                raise DPoPProofRefused(
                    "the agent token is bound to a key (DPoP): forward the agent's DPoP "
                    "proof for this call in the DPoP header",
                    reason="dpop_proof_missing",
                )
            await self._verifier.verify(
                proof,
                method=htm,
                url_base=gateway_url,
                access_token=token,
                jkt=jkt,
                check_nonce=False,  # made for the gateway, which has its own nonces if any
                replay_scope="fetch-hint" if hinted else "fetch",
            )
        except DPoPError as exc:
            raise _refusal(exc, at_resource=True, what="agent's DPoP proof: ") from None
        except StateUnavailable:
            raise _state_down() from None
