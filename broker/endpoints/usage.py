"""The gateways' usage reports: ``POST /v1/usage`` (see `broker.usage.service`)."""

from __future__ import annotations

from fastapi import Request

from broker.client_auth import AuthenticatedClient
from broker.endpoints.edge import Edge, PostRoute, Routes
from broker.oauth_request import OAuthForm


def usage_routes(edge: Edge) -> Routes:
    usage = edge.services.usage

    async def report_usage(
        _: Request, body: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        return await usage.report(body, client, request_id=request_id)

    return [PostRoute("/v1/usage", report_usage, json_document=True)]
