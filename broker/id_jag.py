"""Enterprise-managed authorization (draft-ietf-oauth-identity-assertion-authz-grant, "ID-JAG";
MCP's SEP-990; Okta's Cross App Access), in both roles.

* As the enterprise's token service (`IdJagIssuance`, reached through the token exchange with
  ``requested_token_type=urn:ietf:params:oauth:token-type:id-jag``): an agent holding a person's
  SSO token (or a broker token) asks for an Identity Assertion JWT Authorization Grant for one
  authorization server (``audience``, registered under ``authorization_servers`` in the policy)
  and one of its resources (``resource``). The policy decides as for any exchange, with the
  resource as the audience: the grant's scopes are a subset of the person's rights, every
  agent's ceiling and the parent token's. The answer is ``token_type: N_A``.
* As an MCP server's authorization server (`JwtBearerGrant`, ``grant_type=urn:ietf:params:
  oauth:grant-type:jwt-bearer``, RFC 7523): an agent authenticates and presents an ID-JAG from a
  trusted issuer (this broker, or an IdP under ``id_jag.trusted_issuers``). Checked: ``typ``
  oauth-id-jag+jwt (a broker access token is not an ID-JAG, and an ID-JAG is never an access
  token), the signature by the issuer's published keys, ``aud`` exactly this broker's issuer,
  ``client_id`` the authenticated client, ``exp``, a bounded lifetime, the ``jti`` single use
  across replicas, the ``resource`` registered for this broker, the key binding (``cnf``) when
  there is one. The agent token issued is decided again under the policy in force, never wider
  than the ID-JAG.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import httpx

from broker.audit import DecisionLog
from broker.binding import TokenBinding
from broker.client_auth import AuthenticatedClient
from broker.clock import Clock
from broker.dpop import DPoPProof, b64url, cnf_jkt
from broker.errors import (
    InvalidClient,
    InvalidDPoPProof,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    OAuthError,
    TemporarilyUnavailable,
    UnauthorizedClient,
)
from broker.exchange import (
    DECISION_ERRORS,
    Prepared,
    bounded_lifetime,
    policy_question,
    record_denial,
    refuse,
)
from broker.oauth_request import OAuthForm
from broker.policy import ExchangeRequest, ParentGrant, Person, Policy, decide
from broker.policy.id_jag import decide_id_jag
from broker.revocation import Revocations, check_exchange_allowed
from broker.settings import IdJagConfig
from broker.state import StateStore, StateUnavailable
from broker.tokens import ID_JAG_TYP, Keyring, TokenIssuer, TokenTooLarge, actor_chain_from_claim
from broker.types import BrokerToken, Provenance, TokenType
from idp_adapters.base import IdentityProviderUnavailable, TokenRejected
from idp_adapters.jwks import JwksCache, SigningKeyResolver
from idp_adapters.jwt_verify import unverified_claims, verify_jwt

JWT_BEARER_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ID_JAG_GRANT_PROFILE = "urn:ietf:params:oauth:grant-profile:id-jag"
MAX_ID_JAG_BYTES = 16384
MAX_ID_JAG_LIFETIME_SECONDS = 3600
"""An ID-JAG living longer than this is refused (its ``jti`` is remembered as long)."""


def _one(form: OAuthForm, name: str) -> str:
    values = form.get_all(name)
    if len(values) != 1 or not values[0] or len(values[0]) > 512:
        raise InvalidTarget(f"an ID-JAG request names exactly one {name}")
    return values[0]


class IdJagIssuance:
    """Issues ID-JAGs for registered authorization servers (the token service's role)."""

    def __init__(
        self,
        *,
        issuer: TokenIssuer,
        decisions: DecisionLog,
        clock: Clock,
        own_issuer: str,
        config: IdJagConfig,
        max_lifetime_seconds: int,
    ) -> None:
        self._issuer = issuer
        self._decisions = decisions
        self._clock = clock
        self._own_issuer = own_issuer
        self._lifetime = config.lifetime_seconds
        self._max_lifetime = max_lifetime_seconds
        self._approval_endpoint = own_issuer + "/oauth2/bc-authorize"

    async def issue(
        self,
        form: OAuthForm,
        prepared: Prepared,
        record: dict[str, Any],
        dpop: DPoPProof | None,
    ) -> dict[str, Any]:
        policy, actor, parent = prepared.policy, prepared.actor, prepared.parent
        audience = _one(form, "audience")
        resource = _one(form, "resource")
        record.update(issued_token_type=str(TokenType.ID_JAG), id_jag_audience=audience)
        verdict = decide_id_jag(
            policy,
            policy_question(prepared),
            audience=audience,
            resource=resource,
            own_issuer=self._own_issuer,
        )
        record["authorization_server"] = verdict.server
        if verdict.decision is not None:
            record["agent_chain"] = list(verdict.decision.actor_chain)
        if not verdict.allowed or verdict.decision is None:
            if verdict.decision is not None:
                raise refuse(verdict.decision, self._approval_endpoint)
            raise DECISION_ERRORS[verdict.error or "invalid_grant"](
                verdict.description, reason=verdict.reason
            )
        decision = verdict.decision
        lifetime = min(
            self._lifetime,
            bounded_lifetime(
                self._clock.now(),
                decision.max_lifetime_seconds,
                self._max_lifetime,
                prepared.provenance.session_expires_at,
                parent.expires_at if parent is not None else None,
            ),
        )
        try:
            issued = self._issuer.issue_id_jag(
                provenance=prepared.provenance,
                client_id=verdict.client_id or actor.client_id,
                actor_chain=decision.actor_chain,
                scopes=decision.scopes,
                audience=audience,
                resource=resource,
                lifetime_seconds=lifetime,
                policy_version=decision.policy_version,
                jkt=dpop.jkt if dpop else None,
            )
        except TokenTooLarge as exc:
            raise InvalidRequest(
                f"the ID-JAG would be {exc.size} bytes, more than {exc.limit}",
                reason="token_too_large",
            ) from None
        self._decisions.record(
            "token.exchange",
            outcome="granted",
            reason="granted",
            granted_scopes=list(decision.scopes),
            audiences=[audience],
            resource=resource,
            jti=issued.jti,
            expires_in=lifetime,
            **record,
        )
        return {
            "access_token": issued.token,
            "issued_token_type": str(TokenType.ID_JAG),
            "token_type": "N_A",
            "expires_in": lifetime,
            "scope": " ".join(decision.scopes),
        }


class _TrustedIssuer:
    def __init__(self, name: str, keys: SigningKeyResolver, algorithms: tuple[str, ...]) -> None:
        self.name = name
        self.keys = keys
        self.algorithms = algorithms


class JwtBearerGrant:
    """The token endpoint's RFC 7523 jwt-bearer grant for ID-JAGs (a `GrantHandler`)."""

    grant_type = JWT_BEARER_GRANT_TYPE
    repeatable: frozenset[str] = frozenset()

    def __init__(
        self,
        *,
        config: IdJagConfig,
        keyring: Keyring,
        own_algorithms: tuple[str, ...],
        http: httpx.AsyncClient,
        policy: Callable[[], Policy],
        issuer: TokenIssuer,
        decisions: DecisionLog,
        clock: Clock,
        state: StateStore,
        revocations: Revocations,
        own_issuer: str,
        max_lifetime_seconds: int,
        leeway_seconds: int,
    ) -> None:
        self._policy = policy
        self._issuer = issuer
        self._decisions = decisions
        self._clock = clock
        self._state = state
        self._revocations = revocations
        self._own_issuer = own_issuer
        self._max_lifetime = max_lifetime_seconds
        self._leeway = leeway_seconds
        self._approval_endpoint = own_issuer + "/oauth2/bc-authorize"
        self._trusted: dict[str, _TrustedIssuer] = {}
        if config.accept_own:
            self._trusted[own_issuer] = _TrustedIssuer("", keyring, own_algorithms)
        for entry in config.trusted_issuers:
            self._trusted[entry.issuer] = _TrustedIssuer(
                entry.name,
                JwksCache(
                    entry.jwks_uri,
                    http,
                    clock,
                    min_refresh_interval=30.0,
                    max_age=300.0,
                    timeout=5.0,
                ),
                tuple(entry.algorithms),
            )

    async def handle(
        self,
        form: OAuthForm,
        client: AuthenticatedClient | None,
        *,
        request_id: str,
        dpop: DPoPProof | None = None,
    ) -> dict[str, Any]:
        record: dict[str, Any] = {"request_id": request_id, "grant_type": self.grant_type}
        try:
            return await self._handle(form, client, record, dpop)
        except OAuthError as err:
            record_denial(self._decisions, "token.jwt_bearer", err, record)
            raise

    async def _verify(self, assertion: str) -> tuple[dict[str, Any], _TrustedIssuer]:
        try:
            iss = unverified_claims(assertion, max_bytes=MAX_ID_JAG_BYTES).get("iss")
        except TokenRejected as exc:
            raise InvalidGrant(
                f"assertion is not a well-formed JWT: {exc.reason}", reason="assertion_malformed"
            ) from None
        trusted = self._trusted.get(iss) if isinstance(iss, str) else None
        if trusted is None:
            raise InvalidGrant(
                "assertion issuer is not a trusted ID-JAG issuer", reason="untrusted_issuer"
            )
        try:
            verified = await verify_jwt(
                assertion,
                keys=trusted.keys,
                issuer=iss,
                audiences=(self._own_issuer,),
                algorithms=trusted.algorithms,
                clock=self._clock,
                leeway=self._leeway,
                max_bytes=MAX_ID_JAG_BYTES,
                require=("exp", "iat", "iss", "sub", "aud", "jti", "client_id"),
                allowed_typ=(ID_JAG_TYP,),
            )
        except TokenRejected as exc:
            raise InvalidGrant(
                f"assertion rejected: {exc.reason}", debug=exc.debug, reason="assertion_rejected"
            ) from None
        except IdentityProviderUnavailable as exc:
            raise TemporarilyUnavailable(
                f"cannot verify the assertion: {exc.reason}", reason="idp_unavailable"
            ) from None
        return verified.claims, trusted

    async def _handle(
        self,
        form: OAuthForm,
        client: AuthenticatedClient | None,
        record: dict[str, Any],
        dpop: DPoPProof | None,
    ) -> dict[str, Any]:
        policy = self._policy()
        record["policy_version"] = policy.version
        if client is None:
            raise InvalidClient("client authentication is required")
        record.update(client_id=client.client_id, client_auth=client.method)
        if client.kind != "agent":
            raise UnauthorizedClient(f"client {client.client_id!r} is not an agent")
        assertion = form.non_empty("assertion")
        if assertion is None:
            raise InvalidRequest("assertion (the ID-JAG) is required")
        claims, trusted = await self._verify(assertion)
        record["id_jag_issuer"] = trusted.name or "self"

        # Draft §4.3: the audience is this authorization server, exactly.
        if claims["aud"] not in (self._own_issuer, [self._own_issuer]):
            raise InvalidGrant(
                "the ID-JAG is not for this authorization server only", reason="assertion_audience"
            )
        if claims["client_id"] != client.client_id:
            raise InvalidGrant(
                "the ID-JAG was issued to another client", reason="assertion_client_mismatch"
            )
        iat, exp = claims["iat"], claims["exp"]
        if not isinstance(iat, int | float) or exp - iat > MAX_ID_JAG_LIFETIME_SECONDS:
            raise InvalidGrant(
                f"the ID-JAG lives longer than {MAX_ID_JAG_LIFETIME_SECONDS} s",
                reason="assertion_lifetime",
            )
        resource = claims.get("resource")
        if not isinstance(resource, str):
            raise InvalidGrant("the ID-JAG names no resource", reason="assertion_resource")
        requested_resource = form.get_all("resource")
        if requested_resource and requested_resource != [resource]:
            raise InvalidTarget("resource differs from the ID-JAG's resource")
        registrations = policy.authorization_server(self._own_issuer, self._own_issuer)
        if not any(resource in server.resources for _, server in registrations):
            raise InvalidTarget(
                "the ID-JAG's resource is not one this broker issues tokens for",
                reason="unknown_resource",
            )
        try:
            jkt = cnf_jkt(claims)
        except ValueError:
            raise InvalidGrant(
                "the ID-JAG's cnf is malformed", reason="assertion_rejected"
            ) from None
        if jkt is not None and (dpop is None or dpop.jkt != jkt):
            raise InvalidDPoPProof(
                "the ID-JAG is bound to a key (cnf): send a DPoP proof by that key",
                reason="dpop_key_mismatch",
            )
        granted = claims.get("scope", "")
        if not isinstance(granted, str):
            raise InvalidGrant("the ID-JAG's scope is malformed", reason="assertion_rejected")
        granted_scopes = tuple(dict.fromkeys(granted.split()))
        scope = form.get("scope")
        requested = tuple(dict.fromkeys(scope.split())) if scope is not None else granted_scopes
        if not requested or not set(requested) <= set(granted_scopes):
            raise InvalidScope("scope must be a non-empty subset of the ID-JAG's scope")

        try:
            if trusted.name:  # another IdP's ID-JAG: the person as that IdP names them
                chain: tuple[str, ...] = (client.client_id,)
                provenance = Provenance(
                    idp=trusted.name,
                    subject=claims["sub"],
                    groups=frozenset(),
                    auth_time=claims.get("auth_time")
                    if isinstance(claims.get("auth_time"), int)
                    else None,
                    token_type=TokenType.ID_JAG,
                    session_expires_at=int(iat) + self._max_lifetime,
                )
            else:
                chain = actor_chain_from_claim(claims.get("act"))
                provenance = Provenance.from_claim(claims.get("provenance"))
                if provenance.person_id != claims["sub"] or not chain:
                    raise ValueError("sub or act do not match")
        except (KeyError, ValueError, TypeError):
            raise InvalidGrant("the ID-JAG is malformed", reason="assertion_rejected") from None
        if chain[0] != client.client_id:
            raise InvalidGrant(
                "the ID-JAG's agent chain does not end with this client",
                reason="assertion_client_mismatch",
            )
        record.update(
            person=provenance.person_id,
            idp=provenance.idp,
            provenance=provenance.to_claim(),
            requested_scopes=list(requested),
            requested_audiences=[resource],
        )
        used = policy.identity_used(Person.of(provenance), client.client_id)
        provenance = replace(provenance, groups=used.groups, idp_roles=used.idp_roles)
        # This broker's own ID-JAG is checked as a parent token would be (its id, and the
        # person and every agent of its chain against revocations after it was issued);
        # another IdP's vouches for the person at its sign-in or issue time.
        await check_exchange_allowed(
            self._revocations,
            person=provenance.person_id,
            subject_time=provenance.auth_time or iat,
            parent=None
            if trusted.name
            else BrokerToken(
                jti=str(claims["jti"]),
                subject=provenance.person_id,
                client_id=client.client_id,
                scopes=frozenset(granted_scopes),
                audiences=(resource,),
                actor_chain=chain,
                provenance=provenance,
                policy_version=str(claims.get("policy_version", "")),
                issued_at=int(iat),
                expires_at=int(exp),
                parent_jti=None,
                claims=claims,
            ),
            actor=client.client_id,
            actor_credential_time=client.issued_at,
        )
        agent = policy.agents.get(client.client_id)
        TokenBinding.require(
            client.client_id,
            agent is not None and agent.spec.dpop == "required",
            dpop,
            parent_bound=jkt is not None,
        )
        # Single use, across replicas, for as long as the ID-JAG could be accepted.
        replay_key = "idjag:" + b64url(
            hashlib.sha256(f"{claims['iss']}|{claims['jti']}".encode()).digest()
        )
        try:
            first = await self._state.use_once(
                replay_key, max(exp - self._clock.now(), 0) + self._leeway + 1
            )
        except StateUnavailable:
            raise TemporarilyUnavailable(
                "replay state cannot be checked right now; refusing (fail closed)",
                reason="state_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        if not first:
            raise InvalidGrant("the ID-JAG has been used before", reason="assertion_replayed")

        parent = (
            ParentGrant(chain[1:], frozenset(granted_scopes), (resource,))
            if len(chain) > 1
            else None
        )
        decision = decide(
            policy,
            ExchangeRequest(
                person=used,
                agent=client.client_id,
                scopes=requested,
                audiences=(resource,),
                parent=parent,
            ),
        )
        record["agent_chain"] = list(decision.actor_chain)
        if not decision.allowed:
            raise refuse(decision, self._approval_endpoint)
        if not set(decision.scopes) <= set(granted_scopes):  # never wider than the ID-JAG
            raise InvalidScope("the decision exceeds the ID-JAG", reason="assertion_scope")
        lifetime = bounded_lifetime(
            self._clock.now(),
            decision.max_lifetime_seconds,
            self._max_lifetime,
            provenance.session_expires_at,
            None,
        )
        try:
            issued = self._issuer.issue(
                provenance=provenance,
                client_id=client.client_id,
                actor_chain=decision.actor_chain,
                scopes=decision.scopes,
                audiences=decision.audiences,
                lifetime_seconds=lifetime,
                policy_version=decision.policy_version,
                parent_jti=None,
                jkt=dpop.jkt if dpop else None,
            )
        except TokenTooLarge as exc:
            raise InvalidRequest(
                f"the token would be {exc.size} bytes, more than {exc.limit}",
                reason="token_too_large",
            ) from None
        self._decisions.record(
            "token.jwt_bearer",
            outcome="granted",
            reason="granted",
            granted_scopes=list(decision.scopes),
            audiences=list(decision.audiences),
            id_jag_jti=claims["jti"],
            jti=issued.jti,
            expires_in=lifetime,
            jkt=dpop.jkt if dpop else None,
            **record,
        )
        return {
            "access_token": issued.token,
            "issued_token_type": str(TokenType.ACCESS_TOKEN),
            "token_type": "DPoP" if dpop else "Bearer",
            "expires_in": lifetime,
            "scope": " ".join(decision.scopes),
        }


def id_jag_metadata() -> Mapping[str, Any]:
    """What the authorization server metadata says about ID-JAGs."""
    return {"authorization_grant_profiles_supported": [ID_JAG_GRANT_PROFILE]}
