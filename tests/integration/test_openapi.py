"""The published API description (`GET /openapi.json`) is valid OpenAPI 3.1 and describes exactly
the routes the app serves, with the methods it serves them with."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from broker.app import create_app
from broker.openapi import OPENAPI_PATH
from tests.support.harness import RunningBroker, run_broker

# Methods Starlette adds by itself (HEAD for every GET) are not operations of their own.
_IMPLIED = {"HEAD"}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    with run_broker(tmp_path_factory.mktemp("openapi"), []) as running:
        yield running


@pytest.fixture(scope="module")
def document(broker: RunningBroker) -> dict:
    response = httpx.get(f"{broker.url}{OPENAPI_PATH}", timeout=10)
    assert response.status_code == 200
    return response.json()


def _served_operations(broker: RunningBroker) -> set[tuple[str, str]]:
    """(path, method) of every route `create_app` registers (the app the harness serves)."""
    app = create_app(broker.settings, services=broker.services)
    return {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or set()) - _IMPLIED
    }


def test_the_document_is_valid_openapi_3_1(document: dict) -> None:
    assert document["openapi"].startswith("3.1.")
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema


def test_every_route_is_described_and_every_description_is_served(
    broker: RunningBroker, document: dict
) -> None:
    described = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    }
    served = _served_operations(broker)
    assert served, "the app serves no routes?"
    assert served - described == set(), "served but not described in /openapi.json"
    assert described - served == set(), "described in /openapi.json but not served"


def test_every_operation_documents_the_oauth_error_body(document: dict) -> None:
    error = document["components"]["schemas"]["OAuthError"]
    assert error["required"] == ["error"]
    assert {"error", "error_description", "error_uri"} <= set(error["properties"])
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method != "post":
                continue
            statuses = set(operation["responses"])
            assert {"200", "400", "401", "429", "503"} <= statuses, (method, path)
            assert operation["requestBody"]["content"], (method, path)
            assert "security" in operation, (method, path)


def test_form_and_json_bodies_are_described_where_the_broker_reads_them(document: dict) -> None:
    paths = document["paths"]
    form = "application/x-www-form-urlencoded"
    for path in ("/oauth2/token", "/oauth2/introspect", "/oauth2/revoke"):
        assert set(paths[path]["post"]["requestBody"]["content"]) == {form}
    for path in (
        "/v1/credentials/{name}",
        "/v1/admin/revocations",
        "/v1/admin/policy/reload",
        "/v1/admin/credentials/{name}/refresh",
    ):
        assert set(paths[path]["post"]["requestBody"]["content"]) == {form, "application/json"}
    fetch = paths["/v1/credentials/{name}"]["post"]
    assert {p.get("name") for p in fetch["parameters"]} >= {"name", "version"}
    assert "rejected_version" in fetch["requestBody"]["content"][form]["schema"]["properties"]


def test_served_with_cache_control_and_advertised_in_the_metadata(broker: RunningBroker) -> None:
    served = httpx.get(f"{broker.url}{OPENAPI_PATH}", timeout=10)
    assert served.headers["cache-control"] == "max-age=300"
    assert served.json()["servers"] == [{"url": broker.url}]
    metadata = httpx.get(f"{broker.url}/.well-known/oauth-authorization-server", timeout=10)
    assert metadata.json()["openapi_uri"] == f"{broker.url}{OPENAPI_PATH}"

