"""`CredentialAuth` when the provider refuses the key (httpx.MockTransport for the broker and the
provider): it reports the rejected version to the broker and retries once, only with a newer
version; a broker it cannot reach is `BrokerUnavailable`."""

from __future__ import annotations

from urllib.parse import parse_qs

import httpx
import pytest

from broker.client import BrokerClientError, BrokerUnavailable, GatewayClient

KEYS = {"1": "sk-one-CANARY", "2": "sk-two-CANARY"}


class FakeBroker:
    """Serves `held` unless a hint names it and `store` has moved on (like the real cache)."""

    def __init__(self, held: str = "1", store: str = "1") -> None:
        self.held = held
        self.store = store
        self.forms: list[dict[str, str]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        self.forms.append(form)
        if form.get("rejected_version") == self.held:
            self.held = self.store
        body = {"credential": "openai-api-key", "value": KEYS[self.held], "version": self.held}
        return httpx.Response(200, json={**body, "refresh_in": 60, "served_for": {}})


class FakeProvider:
    def __init__(self, accepts: str | None) -> None:
        self.accepts = accepts
        self.seen: list[tuple[str | None, bytes]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        header = request.headers.get("authorization")
        self.seen.append((header, request.read()))
        if self.accepts is not None and header == f"Bearer {KEYS[self.accepts]}":
            return httpx.Response(200, json={"ok": True})
        return httpx.Response(401, json={"error": {"code": "invalid_api_key"}})


def clients(broker: FakeBroker, provider: FakeProvider) -> tuple[GatewayClient, httpx.Client]:
    gateway = GatewayClient(
        "http://broker.test",
        "llm-gateway",
        "gateway-secret",
        http=httpx.Client(transport=httpx.MockTransport(broker.handler)),
    )
    provider_http = httpx.Client(
        base_url="http://provider.test", transport=httpx.MockTransport(provider.handler)
    )
    return gateway, provider_http


def test_a_refused_key_is_reported_and_the_call_retried_once_with_the_newer_one() -> None:
    broker, provider = FakeBroker(held="1", store="2"), FakeProvider(accepts="2")
    gateway, http = clients(broker, provider)
    auth = gateway.auth("openai-api-key", "agent-token")
    response = http.post("/v1/chat/completions", json={"messages": ["hi"]}, auth=auth)
    assert response.status_code == 200
    assert [form.get("rejected_version") for form in broker.forms] == [None, "1"]
    assert all(form["token"] == "agent-token" for form in broker.forms)
    assert [header for header, _ in provider.seen] == [f"Bearer {KEYS['1']}", f"Bearer {KEYS['2']}"]
    assert provider.seen[0][1] == provider.seen[1][1] == b'{"messages":["hi"]}'  # body replayed
    assert (auth.retries, auth.last_version) == (1, "2")
    # The next call uses the new version straight away: no hint, no retry.
    assert http.post("/v1/chat/completions", auth=auth).status_code == 200
    assert broker.forms[-1].get("rejected_version") is None and auth.retries == 1


def test_no_retry_when_the_broker_has_nothing_newer() -> None:
    broker, provider = FakeBroker(held="1", store="1"), FakeProvider(accepts=None)
    gateway, http = clients(broker, provider)
    auth = gateway.auth("openai-api-key", "agent-token")
    response = http.post("/v1/chat/completions", auth=auth)
    assert response.status_code == 401  # the provider's own answer, as it is
    assert response.json() == {"error": {"code": "invalid_api_key"}}
    assert len(provider.seen) == 1 and auth.retries == 0
    assert [form.get("rejected_version") for form in broker.forms] == [None, "1"]


def test_at_most_one_retry_even_if_the_newer_key_is_refused_too() -> None:
    broker, provider = FakeBroker(held="1", store="2"), FakeProvider(accepts=None)
    gateway, http = clients(broker, provider)
    auth = gateway.auth("openai-api-key", "agent-token")
    assert http.post("/v1/chat/completions", auth=auth).status_code == 401
    assert len(provider.seen) == 2 and len(broker.forms) == 2 and auth.retries == 1


@pytest.mark.parametrize("status", [200, 403, 429, 500])
def test_other_answers_are_not_retried(status: int) -> None:
    broker = FakeBroker(held="1", store="2")
    gateway = GatewayClient(
        "http://broker.test",
        "llm-gateway",
        "secret",
        http=httpx.Client(transport=httpx.MockTransport(broker.handler)),
    )
    with httpx.Client(
        base_url="http://provider.test",
        transport=httpx.MockTransport(lambda _: httpx.Response(status)),
    ) as http:
        assert http.get("/", auth=gateway.auth("openai-api-key", "t")).status_code == status
    assert len(broker.forms) == 1


def test_retry_can_be_turned_off() -> None:
    broker, provider = FakeBroker(held="1", store="2"), FakeProvider(accepts="2")
    gateway, http = clients(broker, provider)
    auth = gateway.auth("openai-api-key", "agent-token", retry_statuses=())
    assert http.post("/v1/chat/completions", auth=auth).status_code == 401
    assert len(broker.forms) == 1


def test_an_unreachable_broker_is_broker_unavailable_not_a_transport_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    provider = FakeProvider(accepts="1")
    gateway = GatewayClient(
        "http://broker.test",
        "llm-gateway",
        "secret",
        http=httpx.Client(transport=httpx.MockTransport(refuse)),
    )
    with (
        httpx.Client(
            base_url="http://provider.test", transport=httpx.MockTransport(provider.handler)
        ) as http,
        pytest.raises(BrokerUnavailable) as excinfo,
    ):
        http.post("/", auth=gateway.auth("openai-api-key", "agent-token"))
    err = excinfo.value
    assert isinstance(err, BrokerClientError)
    assert (err.error, err.status, err.retry_after) == ("temporarily_unavailable", 503, 1.0)
    assert isinstance(err.__cause__, httpx.ConnectError)
    assert provider.seen == []  # the provider was never called without a key
    # Plain fetches keep raising httpx's own error.
    with pytest.raises(httpx.ConnectError):
        gateway.fetch("openai-api-key", "agent-token")


def test_retry_after_is_read_from_broker_refusals() -> None:
    def busy(_: httpx.Request) -> httpx.Response:
        return httpx.Response(
            503,
            json={"error": "temporarily_unavailable", "error_description": "store down"},
            headers={"Retry-After": "2"},
        )

    gateway = GatewayClient(
        "http://broker.test", "g", "s", http=httpx.Client(transport=httpx.MockTransport(busy))
    )
    with pytest.raises(BrokerClientError) as excinfo:
        gateway.fetch("openai-api-key", "agent-token")
    assert (excinfo.value.status, excinfo.value.retry_after) == (503, 2.0)
    assert "agent-token" not in repr(excinfo.value) and "agent-token" not in str(excinfo.value)
