"""The admin API: revocations and policy reload (each admin holds only the permissions its
policy entry lists; `broker.policy.access.require_admin`)."""

from __future__ import annotations

from fastapi import Request

from broker.client_auth import AuthenticatedClient
from broker.endpoints.edge import Edge, PostRoute, Routes
from broker.errors import InvalidPolicy
from broker.oauth_request import OAuthForm
from broker.policy.access import require_admin
from broker.policy.store import PolicyRejected
from broker.policy.watch import PolicyWatcher
from broker.revocation import RevocationEndpoints


def admin_routes(edge: Edge, policy_watcher: PolicyWatcher) -> Routes:
    services = edge.services
    revocation = RevocationEndpoints(
        services.revocations, services.broker_tokens, services.policies.current
    )

    async def admin_revoke(
        _: Request, form: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        return await revocation.revoke_by_admin(form, client, request_id=request_id)

    async def admin_policy_reload(
        _: Request, __: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        admin = require_admin(services.policies.current(), client, "policy:reload")
        try:
            result = await policy_watcher.reload(trigger="admin", by=admin)
        except PolicyRejected as exc:
            raise InvalidPolicy(
                "policy rejected, previous version still serving: " + "; ".join(exc.problems),
                reason="policy_rejected",
            ) from None
        return {
            "version": result.version,
            "previous_version": result.previous_version,
            "changed": result.changed,
            "warnings": len(result.warnings),
        }

    return [
        PostRoute("/v1/admin/revocations", admin_revoke, json_body=True),
        PostRoute("/v1/admin/policy/reload", admin_policy_reload, json_body=True),
    ]
