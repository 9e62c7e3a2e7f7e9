"""The approvals configuration block: sign-in only through a configured OIDC identity provider
whose accepted client ids include the sign-in client (its ID tokens are verified by the broker's
own adapter), ``openid`` in the scopes, and the session key from a reference (or one per
process, said in the log)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydantic import ValidationError

from broker.approvals.web import session_secret
from broker.settings import BrokerSettings

IDP = {
    "name": "corp",
    "issuer": "https://sso.example.com",
    "client_ids": ["broker-web"],
    "audiences": ["broker-approvals"],
}


def settings(**approvals: Any) -> BrokerSettings:
    return BrokerSettings(identity_providers=[IDP], approvals=approvals)


def test_a_valid_block() -> None:
    configured = settings(
        sign_in=[{"idp": "corp", "client_id": "broker-web"}], api_audiences=["broker-approvals"]
    )
    [entry] = configured.approvals.sign_in
    assert entry.scopes == ["openid", "profile", "email"] and entry.client_secret_ref is None
    assert configured.approvals.session_max_age_seconds == 3600


@pytest.mark.parametrize(
    ("approvals", "message"),
    [
        ({"sign_in": [{"idp": "nobody", "client_id": "broker-web"}]}, "not an OIDC identity"),
        ({"sign_in": [{"idp": "corp", "client_id": "other"}]}, "not among the client_ids"),
        (
            {"sign_in": [{"idp": "corp", "client_id": "broker-web", "scopes": ["email"]}]},
            "must include openid",
        ),
        (
            {"sign_in": [{"idp": "corp", "client_id": "broker-web"}] * 2},
            "one entry per identity provider",
        ),
        (
            {"sign_in": [{"idp": "corp", "client_id": "broker-web", "client_secret_ref": "s3"}]},
            "client_secret_ref",
        ),
        ({"session_secret_ref": "plain-secret"}, "session_secret_ref"),
    ],
)
def test_refused_blocks_say_why(approvals: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        settings(**approvals)


def test_the_session_key_comes_from_its_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPROVALS_SESSION_KEY", "k" * 40)
    configured = settings(
        sign_in=[{"idp": "corp", "client_id": "broker-web"}],
        session_secret_ref="env:APPROVALS_SESSION_KEY",
    )
    assert session_secret(configured) == "k" * 40


def test_without_a_reference_the_key_is_per_process_and_the_log_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    configured = settings(sign_in=[{"idp": "corp", "client_id": "broker-web"}])
    with caplog.at_level(logging.WARNING):
        first, second = session_secret(configured), session_secret(configured)
    assert first != second and len(first) >= 32
    assert "do not span replicas" in caplog.text
