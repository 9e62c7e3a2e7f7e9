"""The gateway's credential endpoint and the admin refresh of a credential."""

from __future__ import annotations

from fastapi import Request

from broker.client_auth import AuthenticatedClient
from broker.endpoints.edge import Edge, PostRoute, Routes
from broker.errors import InvalidClient
from broker.oauth_request import OAuthForm


def credential_routes(edge: Edge) -> Routes:
    credentials = edge.services.credentials

    async def fetch_credential(
        request: Request, form: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        if client is None:  # record little before the caller is known: not the name it asked
            raise InvalidClient("gateway authentication is required")
        return await credentials.fetch(
            request.path_params["name"],
            form,
            client,
            version=request.query_params.get("version"),
            request_id=request_id,
            dpop=request.headers.getlist("dpop"),
        )

    async def refresh_credential(
        request: Request, form: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        return await credentials.refresh(request.path_params["name"], client, request_id=request_id)

    return [
        PostRoute("/v1/credentials/{name}", fetch_credential, json_body=True),
        PostRoute("/v1/admin/credentials/{name}/refresh", refresh_credential, json_body=True),
    ]
