"""Operations endpoints: liveness, readiness, Prometheus metrics and the OpenAPI description.
Unauthenticated, like /healthz anywhere: serve /metrics on an internal network only (README)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker.endpoints.edge import Edge, GetRoute, Routes
from broker.openapi import OPENAPI_PATH, openapi_document


def ops_routes(edge: Edge) -> Routes:
    services = edge.services
    api_description = openapi_document(edge.settings.issuer)

    async def openapi(_: Request) -> JSONResponse:
        return JSONResponse(api_description, headers={"Cache-Control": "max-age=300"})

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> JSONResponse:
        ready, checks = await services.readiness.report()
        return JSONResponse(
            {"ready": ready, "checks": checks},
            status_code=200 if ready else 503,
            headers={"Cache-Control": "no-store"},
        )

    async def metrics(_: Request) -> Response:
        # Labels carry fixed codes, route templates and credential names; no tokens or people.
        return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return [
        GetRoute(OPENAPI_PATH, openapi),
        GetRoute("/healthz", healthz),
        GetRoute("/readyz", readyz),
        GetRoute("/metrics", metrics),
    ]
