"""The kit's Starlette/FastAPI adapter over real HTTP: `BrokerAuth` middleware (metadata,
challenges, the caller in request.state, DPoP proofs for the request's own URL) and the `require`
dependency in a FastAPI app, each served by uvicorn on loopback; tokens from a loopback
authorization server.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from broker.dpop import DPoPKey
from broker.kit import Caller, ResourceServer
from broker.kit.starlette import BrokerAuth, caller_of, metadata_routes, require
from idp_adapters._loopback import RunningServer, reserve_loopback_socket, serve_in_thread
from tests.support.kit_fakes import FakeAuthorizationServer, broker_claims, sign


@pytest.fixture(scope="module")
def auth_server() -> Iterator[tuple[FakeAuthorizationServer, RunningServer]]:
    fake = FakeAuthorizationServer()
    with serve_in_thread(fake) as server:
        yield fake, server


def _lifespan(rs: ResourceServer) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await rs.aclose()

    return lifespan


@contextlib.contextmanager
def serve(build: Any, issuer: str, path: str = "") -> Iterator[tuple[str, ResourceServer]]:
    """Serve `build(rs)` on a loopback port whose URL (+ `path`) is the resource identifier."""
    sock = reserve_loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    rs = ResourceServer(
        issuer=issuer, resource=base + path, scopes_supported=["notes:read", "notes:write"]
    )
    try:
        server = serve_in_thread(build(rs), sock=sock, lifespan="on")
    except BaseException:
        sock.close()
        raise
    with server:
        yield base, rs


async def whoami(request: Request) -> JSONResponse:
    caller = caller_of(request)
    assert caller is not None
    return JSONResponse(
        {"person": caller.person, "agents": list(caller.agent_chain), "jkt": caller.jkt}
    )


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True, "caller": caller_of(request) is not None})


async def live_notes(websocket: WebSocket) -> None:
    caller = caller_of(websocket)
    assert caller is not None
    await websocket.accept()
    await websocket.send_text(f"hello {caller.person} via {caller.agent}")
    await websocket.close()


def starlette_app(rs: ResourceServer) -> Starlette:
    app = Starlette(
        routes=[
            Route("/api/notes", whoami, methods=["GET", "POST"]),
            Route("/api/healthz", health),
            WebSocketRoute("/api/live", live_notes),
        ],
        lifespan=_lifespan(rs),
    )
    app.add_middleware(
        BrokerAuth, rs=rs, required_scopes=["notes:read"], exempt_paths=["/api/healthz"]
    )
    return app


@pytest.fixture(scope="module")
def api(auth_server: tuple[FakeAuthorizationServer, RunningServer]) -> Iterator[tuple[str, Any]]:
    fake, server = auth_server
    with serve(starlette_app, server.url, "/api") as (base, rs):
        yield base, (fake, server.url, rs)


def token(api: tuple[str, Any], **claims: Any) -> str:
    base, (fake, issuer, _) = api
    claims.setdefault("aud", f"{base}/api")
    aud = claims.pop("aud")
    return sign(broker_claims(issuer, aud, time.time(), **claims), fake.published[0])


def params(challenge: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', challenge))


WELL_KNOWN = "/.well-known/oauth-protected-resource"


def test_metadata_is_served_without_a_token_at_both_well_known_paths(api: Any) -> None:
    base, (_, issuer, rs) = api
    for path in (f"{WELL_KNOWN}/api", WELL_KNOWN):
        response = httpx.get(base + path)
        assert response.status_code == 200
        assert response.json() == rs.metadata()
        assert response.json()["resource"] == f"{base}/api"
        assert response.json()["authorization_servers"] == [issuer]
        assert response.headers["access-control-allow-origin"] == "*"
    assert httpx.options(base + "/.well-known/oauth-protected-resource/api").status_code == 204
    assert httpx.post(base + "/.well-known/oauth-protected-resource/api").status_code == 405


def test_a_request_without_a_token_gets_both_challenges(api: Any) -> None:
    base, _ = api
    response = httpx.get(f"{base}/api/notes")
    assert response.status_code == 401
    challenges = response.headers.get_list("www-authenticate")
    metadata = f"{base}/.well-known/oauth-protected-resource/api"
    assert challenges[0] == f'Bearer resource_metadata="{metadata}"'
    assert challenges[1].startswith('DPoP algs="ES256')
    assert response.headers["cache-control"] == "no-store"
    exempt = httpx.get(f"{base}/api/healthz")
    assert exempt.status_code == 200 and exempt.json() == {"ok": True, "caller": False}


def test_a_valid_token_reaches_the_handler_with_the_caller(api: Any) -> None:
    base, _ = api
    response = httpx.get(
        f"{base}/api/notes", headers={"Authorization": f"Bearer {token(api)}"}
    )
    assert response.status_code == 200
    assert response.json() == {
        "person": "dev/alice",
        "agents": ["summariser-agent", "triage-agent"],
        "jkt": None,
    }


def test_refusals_over_http(api: Any) -> None:
    base, _ = api
    url = f"{base}/api/notes"
    wrong_aud = httpx.get(url, headers={"Authorization": f"Bearer {token(api, aud=base)}"})
    assert wrong_aud.status_code == 401
    assert params(wrong_aud.headers["www-authenticate"])["error"] == "invalid_token"
    assert wrong_aud.json()["error"] == "invalid_token"
    no_scope = httpx.get(
        url, headers={"Authorization": f"Bearer {token(api, scope='notes:list')}"}
    )
    assert no_scope.status_code == 403
    assert params(no_scope.headers["www-authenticate"]) == {
        "error": "insufficient_scope",
        "error_description": "the token lacks a scope this request needs",
        "scope": "notes:read",
        "resource_metadata": f"{base}/.well-known/oauth-protected-resource/api",
    }
    expired = token(api, exp=int(time.time()) - 5, iat=int(time.time()) - 100, nbf=None)
    response = httpx.get(url, headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401
    assert params(response.headers["www-authenticate"])["error_description"] == (
        "token has expired"
    )
    two = httpx.get(
        url, headers=[("Authorization", f"Bearer {token(api)}"), ("Authorization", "Bearer x")]
    )
    assert two.status_code == 400 and two.json()["error"] == "invalid_request"


def test_dpop_bound_tokens_need_a_proof_for_this_request(api: Any) -> None:
    base, _ = api
    key = DPoPKey()
    bound = token(api, cnf={"jkt": key.jkt})
    url = f"{base}/api/notes"
    ok = httpx.post(
        url + "?page=2",
        headers={
            "Authorization": f"DPoP {bound}",
            "DPoP": key.proof("POST", url, access_token=bound),
        },
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["jkt"] == key.jkt
    as_bearer = httpx.post(url, headers={"Authorization": f"Bearer {bound}"})
    assert as_bearer.status_code == 401
    assert as_bearer.headers["www-authenticate"].startswith('DPoP algs="')
    for proof in (
        key.proof("POST", f"{base}/api/other", access_token=bound),
        key.proof("GET", url, access_token=bound),
        DPoPKey().proof("POST", url, access_token=bound),
    ):
        refused = httpx.post(url, headers={"Authorization": f"DPoP {bound}", "DPoP": proof})
        assert refused.status_code == 401
        assert params(refused.headers["www-authenticate"])["error"] == "invalid_dpop_proof"


def test_websockets_are_authenticated_at_the_handshake(api: Any) -> None:
    base, _ = api
    url = base.replace("http://", "ws://") + "/api/live"
    with connect(url, additional_headers={"Authorization": f"Bearer {token(api)}"}) as ws:
        assert ws.recv(timeout=10) == "hello dev/alice via summariser-agent"
    for headers in ({}, {"Authorization": f"Bearer {token(api, aud=base)}"}):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == 403  # a close before accept


# -- FastAPI: the require() dependency, no middleware --------------------------------------------


def fastapi_app(rs: ResourceServer) -> FastAPI:
    app = FastAPI(lifespan=_lifespan(rs))

    @app.get("/notes")
    async def read(caller: Caller = Depends(require("notes:read", rs=rs))) -> dict[str, Any]:  # noqa: B008
        return {"person": caller.person, "agents": list(caller.agent_chain)}

    @app.post("/notes")
    async def write(caller: Caller = Depends(require("notes:write", rs=rs))) -> dict[str, Any]:  # noqa: B008
        return {"written_by": caller.person}

    for route in metadata_routes(rs):
        app.router.routes.append(route)
    return app


def test_fastapi_dependency(auth_server: tuple[FakeAuthorizationServer, RunningServer]) -> None:
    fake, server = auth_server
    with serve(fastapi_app, server.url) as (base, _):
        good = sign(broker_claims(server.url, base, time.time()), fake.published[0])
        read = httpx.get(f"{base}/notes", headers={"Authorization": f"Bearer {good}"})
        assert read.status_code == 200
        assert read.json() == {
            "person": "dev/alice",
            "agents": ["summariser-agent", "triage-agent"],
        }
        write = httpx.post(f"{base}/notes", headers={"Authorization": f"Bearer {good}"})
        assert write.status_code == 403
        assert params(write.headers["www-authenticate"])["scope"] == "notes:write"
        assert write.headers["www-authenticate"].startswith("Bearer ")
        anonymous = httpx.get(f"{base}/notes")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith(
            f'Bearer resource_metadata="{base}/.well-known/oauth-protected-resource"'
        )
        metadata = httpx.get(f"{base}/.well-known/oauth-protected-resource")
        assert metadata.status_code == 200 and metadata.json()["resource"] == base
