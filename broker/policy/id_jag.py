"""Who may obtain an Identity Assertion JWT Authorization Grant (ID-JAG) for what: a pure
decision, shared by the token exchange (`broker.id_jag.IdJagIssuance`), policy tests
(``kind: id_jag``) and ``broker policy explain``.

The authorization server must be registered (``authorization_servers``), the resource one of
its resources, the agent one of its agents; then the exchange is decided as any other with the
resource as its only audience, so an ID-JAG never carries more than the person's rights, every
agent's ceiling and the parent token's scope.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from broker.policy.engine import Decision, ExchangeRequest, Policy, decide

UNKNOWN_AUTHORIZATION_SERVER = "unknown_authorization_server"
UNKNOWN_RESOURCE = "unknown_resource"
ID_JAG_NOT_ALLOWED = "id_jag_not_allowed"


@dataclass(frozen=True, slots=True)
class IdJagDecision:
    """The answer: granted (`decision` allowed) or refused with an RFC 6749 error."""

    allowed: bool
    error: str | None
    reason: str
    description: str
    server: str | None = None
    """The authorization server's name in the policy."""
    client_id: str | None = None
    """How the agent is known as a client at that authorization server."""
    decision: Decision | None = None


def _refused(error: str, reason: str, description: str, server: str | None = None) -> IdJagDecision:
    return IdJagDecision(False, error, reason, description, server)


def decide_id_jag(
    policy: Policy,
    request: ExchangeRequest,
    *,
    audience: str,
    resource: str,
    own_issuer: str,
) -> IdJagDecision:
    """May ``request.agent`` obtain an ID-JAG for `audience` (an authorization server's issuer;
    ``self`` entries are this broker, `own_issuer`) and `resource`, and with which scopes?"""
    registrations = policy.authorization_server(audience, own_issuer)
    if not registrations:
        return _refused(
            "invalid_target",
            UNKNOWN_AUTHORIZATION_SERVER,
            "audience is not an authorization server registered in the policy",
        )
    serving = [(n, s) for n, s in registrations if resource in s.resources]
    if not serving:
        names = ", ".join(repr(n) for n, _ in registrations)
        return _refused(
            "invalid_target",
            UNKNOWN_RESOURCE,
            f"resource is not one authorization server {names} serves",
            registrations[0][0],
        )
    allowed = [(n, s) for n, s in serving if request.agent in s.agents]
    if not allowed:
        name = serving[0][0]
        return _refused(
            "unauthorized_client",
            ID_JAG_NOT_ALLOWED,
            f"agent {request.agent!r} may not obtain ID-JAGs for authorization server {name!r}",
            name,
        )
    name, server = allowed[0]
    decision = decide(policy, replace(request, audiences=(resource,)))
    if not decision.allowed:
        return IdJagDecision(
            False,
            decision.error or "invalid_grant",
            str(decision.reason),
            decision.description,
            name,
            decision=decision,
        )
    return IdJagDecision(
        True,
        None,
        "granted",
        "granted",
        name,
        server.client_ids.get(request.agent, request.agent),
        decision,
    )
