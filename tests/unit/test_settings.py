"""Configuration: YAML file, BROKER_* overrides, and refusals of unsafe values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from broker.settings import BrokerSettings, load_settings


def test_yaml_then_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text(
        "issuer: https://broker.example.com/\n"
        "tokens: {max_lifetime_seconds: 1200, leeway_seconds: 10}\n"
        "identity_providers:\n"
        "  - {name: okta, issuer: https://example.okta.com, audiences: [api://broker],"
        " preset: okta}\n"
    )
    monkeypatch.setenv("BROKER_TOKENS__MAX_LIFETIME_SECONDS", "600")
    monkeypatch.setenv("BROKER_HTTP__PORT", "9999")
    settings = load_settings(config)
    assert settings.issuer == "https://broker.example.com"  # trailing slash removed
    assert settings.tokens.max_lifetime_seconds == 600  # environment wins
    assert settings.tokens.leeway_seconds == 10  # file value kept
    assert settings.http.port == 9999
    assert settings.identity_providers[0].preset == "okta"


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "provider",
    [
        {"name": "x", "issuer": "http://idp.example.com", "audiences": ["a"]},  # not https
        {
            "name": "x",
            "issuer": "https://idp.example.com",
            "audiences": ["a"],
            "algorithms": ["none"],
        },
        {
            "name": "x",
            "issuer": "https://idp.example.com",
            "audiences": ["a"],
            "algorithms": ["HS256"],
        },
        {"name": "x", "issuer": "https://idp.example.com"},  # no audience at all
        {"name": "Bad/Name", "issuer": "https://idp.example.com", "audiences": ["a"]},
        {"name": "x", "issuer": "https://idp.example.com", "audiences": ["a"], "extra": 1},
    ],
)
def test_unsafe_identity_provider_configs_are_refused(provider: dict) -> None:
    with pytest.raises(ValidationError):
        BrokerSettings(identity_providers=[provider])


def test_broker_issuer_cannot_be_a_trusted_idp() -> None:
    with pytest.raises(ValidationError, match="own issuer"):
        BrokerSettings(
            issuer="https://broker.example.com",
            identity_providers=[
                {"name": "me", "issuer": "https://broker.example.com", "audiences": ["a"]}
            ],
        )


def test_workload_kinds_are_kept_apart_from_people() -> None:
    with pytest.raises(ValidationError):
        BrokerSettings(
            identity_providers=[
                {
                    "name": "k",
                    "kind": "kubernetes",
                    "issuer": "https://k8s.example",
                    "audiences": ["a"],
                }
            ]
        )
    with pytest.raises(ValidationError):
        BrokerSettings(
            workload_issuers=[
                {"name": "k", "kind": "oidc", "issuer": "https://k8s.example", "audiences": ["a"]}
            ]
        )


@pytest.mark.parametrize("interval", [0, 0.0, 0.5, -1, "nan"])
def test_the_unknown_kid_storm_guard_cannot_be_turned_off(interval: object) -> None:
    provider = {"name": "x", "issuer": "https://idp.example.com", "audiences": ["a"]}
    for kind in ("identity_providers", "workload_issuers"):
        with pytest.raises(ValidationError, match="jwks_min_refresh_interval_seconds"):
            BrokerSettings(
                **{kind: [provider | {"jwks_min_refresh_interval_seconds": interval}]}
            )
    assert BrokerSettings(
        identity_providers=[provider | {"jwks_min_refresh_interval_seconds": 1}]
    ).identity_providers[0].jwks_min_refresh_interval_seconds == 1.0


@pytest.mark.parametrize("interval", [0.0, 0.25, float("nan")])
def test_key_caches_refuse_an_interval_below_the_floor(interval: float) -> None:
    import httpx

    from broker.clock import SystemClock
    from idp_adapters.discovery import DiscoveredJwks, OidcDiscovery
    from idp_adapters.jwks import JwksCache

    http = httpx.AsyncClient()
    options = {"min_refresh_interval": interval, "max_age": 60.0, "timeout": 1.0}
    with pytest.raises(ValueError, match="at least"):
        JwksCache("https://idp.example.com/jwks", http, SystemClock(), **options)
    discovery = OidcDiscovery("https://idp.example.com", http, SystemClock(), timeout=1.0)
    with pytest.raises(ValueError, match="at least"):
        DiscoveredJwks(discovery, http, SystemClock(), **options)


def test_several_workers_with_memory_state_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match=r"state\.kind: redis"):
        BrokerSettings(http={"workers": 2})
    monkeypatch.setenv("BROKER_HTTP__WORKERS", "4")
    with pytest.raises(ValidationError, match=r"4 workers with state\.kind: memory"):
        load_settings(None)
    redis = {"kind": "redis", "url": "redis://127.0.0.1:6379/0"}
    assert BrokerSettings(state=redis).http.workers == 4
    monkeypatch.delenv("BROKER_HTTP__WORKERS")
    one = BrokerSettings()
    assert one.per_worker_state_problem() is None
    assert "state.kind: redis" in str(one.per_worker_state_problem(2))  # `serve --workers 2`
