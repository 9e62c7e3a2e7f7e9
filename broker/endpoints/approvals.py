"""The approvals endpoints of agents: OpenID CIBA's backchannel authentication endpoint (the
CIBA grant itself is a grant handler of the token endpoint)."""

from __future__ import annotations

from fastapi import Request

from broker.approvals.ciba import BC_AUTHORIZE_PATH
from broker.client_auth import AuthenticatedClient
from broker.endpoints.edge import Edge, PostRoute, Routes
from broker.exchange import REPEATABLE_PARAMETERS
from broker.oauth_request import OAuthForm


def ciba_routes(edge: Edge) -> Routes:
    backchannel = edge.services.backchannel

    async def bc_authorize(
        _: Request, form: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        return await backchannel.handle(form, client, request_id=request_id)

    return [PostRoute(BC_AUTHORIZE_PATH, bc_authorize, repeatable=REPEATABLE_PARAMETERS)]
