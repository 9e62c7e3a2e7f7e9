"""Broker configuration: one YAML file, every value overridable by ``BROKER_*`` variables.

Nested keys use ``__`` in environment variables, e.g. ``BROKER_TOKENS__MAX_LIFETIME_SECONDS=600``.
Lists (such as ``identity_providers``) are overridden as JSON, e.g.
``BROKER_IDENTITY_PROVIDERS='[{"name": "okta", ...}]'``.

Secrets never appear inline: the signing keys are a directory path, client secrets live (hashed)
in the policy files or behind references.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from broker.urls import is_loopback_url, require_https_unless_loopback
from idp_adapters.jwks import MIN_REFRESH_INTERVAL_SECONDS
from secret_backends.config import SecretBackendConfig, SecretReference

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
SUPPORTED_JWS_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

Preset = Literal["generic", "okta", "entra", "auth0", "keycloak", "google"]
SamlPreset = Literal["generic", "adfs", "okta", "shibboleth"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClaimMapping(_Strict):
    """Which claims carry what. `None` means: take the preset's choice."""

    subject: str | None = Field(None, description="Claim holding the stable subject (e.g. oid).")
    groups: list[str] | None = Field(
        None, description="Claims (dotted paths allowed) whose string values become groups."
    )
    roles: list[str] | None = Field(
        None,
        description="Claims (dotted paths allowed; SAML: attribute names) whose string values "
        "become IdP roles, bound in policy with idp_role: / idp-role:, never as groups.",
    )
    email: str | None = None
    name: str | None = None


class IdentityProviderConfig(_Strict):
    """A trusted issuer of people's identity tokens (or, in `workload_issuers`, of agents')."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["oidc", "dev", "kubernetes", "spiffe", "saml"] = "oidc"
    issuer: str = Field(
        description="Exact `iss` value (kind saml: the IdP entity id); compared byte for byte."
    )
    discovery_url: str | None = Field(
        None, description="Defaults to <issuer>/.well-known/openid-configuration."
    )
    jwks_uri: str | None = Field(None, description="Overrides the jwks_uri from discovery.")
    client_ids: list[str] = Field(
        default_factory=list, description="Accepted `aud` of ID tokens (the IdP app's client ids)."
    )
    audiences: list[str] = Field(
        default_factory=list, description="Accepted `aud` of access tokens / workload JWTs."
    )
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"])
    preset: Preset = "generic"
    claims: ClaimMapping = ClaimMapping()
    leeway_seconds: int = Field(30, ge=0, le=300)
    max_token_bytes: int = Field(16384, ge=512, le=262144)
    jwks_min_refresh_interval_seconds: float = Field(
        30.0,
        ge=MIN_REFRESH_INTERVAL_SECONDS,
        allow_inf_nan=False,
        description="An unknown kid refetches the JWKS at most this often (the storm guard).",
    )
    jwks_max_age_seconds: float = Field(3600.0, gt=0.0)
    http_timeout_seconds: float = Field(5.0, gt=0.0)
    # kind saml only (the IdP's `issuer` is its entity id; `claims.*` name SAML attributes):
    sp_entity_id: str | None = Field(
        None, description="kind saml: this broker's entity id, the only accepted Audience."
    )
    acs_url: str | None = Field(
        None,
        description="kind saml: the only accepted Recipient/Destination (the token endpoint "
        "for RFC 7522 assertions, or the ACS URL of the web sign-in).",
    )
    idp_certificate_ref: str | None = Field(
        None,
        description="kind saml: file:/path to the IdP's PEM signing certificate(s), pinned.",
    )
    saml_preset: SamlPreset = "generic"

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one algorithm is required")
        unknown = [a for a in value if a not in SUPPORTED_JWS_ALGORITHMS]
        if unknown:
            raise ValueError(f"unsupported or insecure algorithms {unknown} (no 'none', no HMAC)")
        return value

    @field_validator("issuer", "discovery_url", "jwks_uri", "acs_url")
    @classmethod
    def _https(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if info.field_name == "issuer" and info.data.get("kind") == "saml":
            if not value.strip():
                raise ValueError("issuer (the SAML entity id) must not be empty")
            return value  # an entity id is a name, never fetched (often http: or urn:)
        return require_https_unless_loopback(value)

    @model_validator(mode="after")
    def _audience_required(self) -> IdentityProviderConfig:
        saml_fields = (self.sp_entity_id, self.acs_url, self.idp_certificate_ref)
        if self.kind == "saml":
            if any(not value for value in saml_fields):
                raise ValueError(
                    f"identity provider {self.name!r}: kind saml needs sp_entity_id, acs_url "
                    "and idp_certificate_ref"
                )
            if not str(self.idp_certificate_ref).startswith("file:"):
                raise ValueError(
                    f"identity provider {self.name!r}: idp_certificate_ref must be file:/path"
                )
            return self  # the audience is sp_entity_id; client_ids/audiences may stay empty
        if any(value is not None for value in saml_fields) or self.saml_preset != "generic":
            raise ValueError(f"identity provider {self.name!r}: SAML settings need kind saml")
        if not self.client_ids and not self.audiences:
            raise ValueError(f"identity provider {self.name!r}: set client_ids and/or audiences")
        return self


class SigningKeysConfig(_Strict):
    directory: Path = Field(Path("var/keys"), description="Where the broker's signing keys live.")
    algorithm: Literal["ES256", "ES384", "RS256", "PS256", "EdDSA"] = "ES256"
    generate_if_missing: bool = Field(
        True, description="Create a first key when the directory holds none."
    )


class TokenLifetimes(_Strict):
    max_lifetime_seconds: int = Field(3600, gt=0, description="Global cap on any issued token.")
    client_assertion_max_lifetime_seconds: int = Field(3600, gt=0, le=86400)
    leeway_seconds: int = Field(30, ge=0, le=300)


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    max_body_bytes: int = Field(65536, ge=1024)
    workers: int = Field(1, ge=1)
    tls_cert_file: Path | None = Field(
        None, description="Serve HTTPS with this PEM certificate (chain) and tls_key_file."
    )
    tls_key_file: Path | None = Field(None, description="The certificate's PEM private key.")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For is "
        "believed for the caller's source address; none by default (the peer address is used).",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                message = f"http.trusted_proxies: {item!r} is not an address or network"
                raise ValueError(message) from None
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("http.tls_cert_file and http.tls_key_file go together")
        return self


class ClientAuthConfig(_Strict):
    """Client authentication: its own pool for secret hashing, and the failed-attempt throttle
    (counted in the shared state, so across every replica). See README, "Client authentication
    under attack"."""

    secret_hash_workers: int | None = Field(
        None, ge=1, le=256, description="Threads checking scrypt client secrets (default: cores)."
    )
    secret_hash_queue: int = Field(
        64,
        ge=0,
        le=100000,
        description="Secret checks that may wait for a thread; more are refused at once (503).",
    )
    failures_per_client_and_source: int = Field(
        10,
        ge=1,
        description="Failed authentications for one client id from one source address per "
        "window; beyond it that pair gets 429 until the window slides.",
    )
    failures_per_source: int = Field(
        100,
        ge=1,
        description="Failed authentications from one source address (any client id) per window.",
    )
    failure_window_seconds: float = Field(300.0, gt=0.0, le=86400.0)


class DevIdpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8081, ge=1, le=65535)
    people_file: Path | None = Field(
        None, description="YAML of example people; defaults to the built-in list."
    )
    redirect_uris: list[str] = Field(
        default_factory=list,
        description="Where its authorization code flow may redirect (exact URLs); default: "
        "the broker's <issuer>/approvals/callback.",
    )


class ApprovalSignInConfig(_Strict):
    """One identity provider approvers sign in with on the approvals page (OIDC authorization
    code + PKCE). `client_id` must be one of that provider's `client_ids`: the ID token the
    sign-in yields is verified by the broker's own adapter for it."""

    idp: str = Field(pattern=NAME_PATTERN, description="A name in identity_providers.")
    client_id: str = Field(min_length=1, description="The broker's client id at that IdP.")
    client_secret_ref: SecretReference | None = Field(
        None, description="env:NAME or file:/path; none: a public client (PKCE only)."
    )
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    label: str | None = Field(None, description="The sign-in button's text (default: the idp).")

    @field_validator("scopes")
    @classmethod
    def _openid(cls, value: list[str]) -> list[str]:
        if "openid" not in value:
            raise ValueError("approvals.sign_in scopes must include openid")
        return value


class ApprovalsConfig(_Strict):
    """The approver's side of approvals: the web page's sign-in and the JSON API's tokens.
    See README, "Approvals"."""

    sign_in: list[ApprovalSignInConfig] = Field(
        default_factory=list,
        description="Identity providers approvers sign in with at /approvals (none: the page "
        "says sign-in is not configured).",
    )
    session_secret_ref: SecretReference | None = Field(
        None,
        description="env:NAME or file:/path: the key signing the approvals session cookie. "
        "Unset: a key generated per process (sessions then end at a restart and do not span "
        "replicas).",
    )
    session_max_age_seconds: int = Field(3600, ge=60, le=86400)
    api_audiences: list[str] = Field(
        default_factory=list,
        description="Audiences an approver's SSO token must carry for /v1/approvals (each also "
        "an accepted audience or client id of its identity provider). None: the API refuses "
        "every token.",
    )

    @model_validator(mode="after")
    def _unique(self) -> ApprovalsConfig:
        names = [s.idp for s in self.sign_in]
        if len(names) != len(set(names)):
            raise ValueError("approvals.sign_in: one entry per identity provider")
        return self


class DPoPConfig(_Strict):
    """DPoP (RFC 9449): how proofs are checked. Bearer stays the default; an agent's policy
    entry can require DPoP (``dpop: required``). See README, "DPoP"."""

    algorithms: list[Literal["ES256", "ES384", "ES512", "PS256", "RS256", "EdDSA"]] = Field(
        default_factory=lambda: ["ES256", "ES384", "ES512", "PS256", "RS256", "EdDSA"],
        min_length=1,
        description="Proof algorithms accepted (asymmetric only).",
    )
    max_age_seconds: int = Field(
        60, ge=5, le=600, description="How old a proof's iat may be (its jti is kept as long)."
    )
    future_skew_seconds: int = Field(5, ge=0, le=60)
    require_nonce: bool = Field(
        False,
        description="Every proof must carry a nonce this broker issued (answered with "
        "use_dpop_nonce and a DPoP-Nonce header).",
    )
    nonce_secret_ref: SecretReference | None = Field(
        None,
        description="env:NAME or file:/path: the key nonces are derived from, shared by every "
        "replica. Unset: one per process (nonces then do not span replicas).",
    )
    nonce_window_seconds: int = Field(300, ge=30, le=3600)


class IdJagIssuerConfig(_Strict):
    """An enterprise IdP whose Identity Assertion JWT Authorization Grants (ID-JAG) the
    jwt-bearer grant accepts, besides the broker's own."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="The person's idp.")
    issuer: str
    jwks_uri: str
    algorithms: list[str] = Field(default_factory=lambda: ["ES256", "RS256", "PS256", "EdDSA"])

    @field_validator("issuer", "jwks_uri")
    @classmethod
    def _https(cls, value: str) -> str:
        require_https_unless_loopback(value)
        return value


class IdJagConfig(_Strict):
    """Enterprise-managed authorization (ID-JAG): as the enterprise's token service, the
    broker issues ID-JAGs for authorization servers registered in the policy; as an MCP
    server's authorization server it redeems them (jwt-bearer). See README, "ID-JAG"."""

    lifetime_seconds: int = Field(300, ge=10, le=3600, description="Of the ID-JAGs issued.")
    accept_own: bool = Field(
        True, description="The jwt-bearer grant accepts ID-JAGs this broker issued."
    )
    trusted_issuers: list[IdJagIssuerConfig] = Field(default_factory=list)


class UsageConfig(_Strict):
    """Usage, pricing and budgets. See README, "Spend and budgets"."""

    time_zone: str = Field(
        "UTC", description="Where budget days and months begin and end (an IANA zone)."
    )
    reservation_hold_seconds: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="How long a fetch's budget reservation waits for the gateway's usage report "
        "before it is released.",
    )
    call_id_ttl_seconds: float = Field(
        40 * 86400.0,
        ge=3600,
        description="How long a reported call id is remembered (a repeat within it is a "
        "duplicate).",
    )
    report_grace_seconds: float = Field(
        86400.0,
        ge=60,
        description="How long after an agent token expires a gateway may still report usage for "
        "the calls it made with it.",
    )
    alert_channels: list[str] = Field(
        default_factory=list,
        description="Notification channels told about unknown models (budgets name their own).",
    )

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value


class DevOpenBaoConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8200, ge=1, le=65535)


class _ChannelDelivery(_Strict):
    timeout_seconds: float = Field(5.0, gt=0.0, le=60.0, description="Per attempt.")
    max_attempts: int = Field(4, ge=1, le=10)
    deadline_seconds: float = Field(30.0, gt=0.0, le=600.0, description="All attempts together.")


class WebhookChannelConfig(_ChannelDelivery):
    """A generic webhook: JSON, signed (``X-Broker-Signature: sha256=<HMAC>`` over
    ``<X-Broker-Timestamp>.<body>``), with an ``Idempotency-Key``."""

    kind: Literal["webhook"]
    url: str = Field(description="https (or http on loopback).")
    secret_ref: SecretReference = Field(description="The HMAC key: env:NAME or file:/path.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return require_https_unless_loopback(value)


class SlackChannelConfig(_ChannelDelivery):
    """A Slack incoming webhook (its URL is a secret: give a reference)."""

    kind: Literal["slack"]
    url_ref: SecretReference


class TeamsChannelConfig(_ChannelDelivery):
    """A Microsoft Teams workflow webhook ("When a Teams webhook request is received")."""

    kind: Literal["teams"]
    url_ref: SecretReference


class EmailChannelConfig(_ChannelDelivery):
    """E-mail through an SMTP relay: STARTTLS (default) or implicit TLS; ``none`` only to a
    loopback relay."""

    kind: Literal["email"]
    host: str = Field(min_length=1)
    port: int = Field(587, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    sender: str = Field(min_length=3, description="The From address.")
    to: list[str] = Field(default_factory=list, description="Always sent to these addresses.")
    to_recipients: bool = Field(
        False, description="Also to the addresses a notification names (e.g. the person's)."
    )
    username: str | None = None
    password_ref: SecretReference | None = None
    ca_file: Path | None = Field(None, description="CA bundle for a relay with a private CA.")

    @model_validator(mode="after")
    def _secure_unless_loopback(self) -> EmailChannelConfig:
        if self.security == "none" and not is_loopback_url(f"smtp://{self.host}"):
            raise ValueError("security: none is allowed only for a loopback SMTP relay")
        if not self.to and not self.to_recipients:
            raise ValueError("an email channel needs `to` addresses or to_recipients: true")
        return self


ChannelConfig = Annotated[
    WebhookChannelConfig | SlackChannelConfig | TeamsChannelConfig | EmailChannelConfig,
    Field(discriminator="kind"),
]


class NotificationSettings(_Strict):
    """Where notifications go (approval requests, later budget alerts): named channels, which
    policy rules name in ``channels:``."""

    channels: dict[Annotated[str, Field(pattern=NAME_PATTERN)], ChannelConfig] = Field(
        default_factory=dict
    )


class SentinelConfig(_Strict):
    """Redis Sentinel: the sentinels that know the primary of `service_name` (redis-py's own
    Sentinel support: a failover is followed without a restart)."""

    service_name: str = Field(min_length=1, max_length=128)
    addresses: list[str] = Field(min_length=1, description="host:port of each sentinel.")
    password_ref: SecretReference | None = Field(
        None, description="env:NAME or file:/path: the sentinels' own password, if any."
    )
    db: int = Field(0, ge=0, le=15)
    tls: bool = Field(
        False, description="TLS to sentinels and primary (state.tls_ca_file: the CA bundle)."
    )

    @field_validator("addresses")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        for address in value:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"sentinel address {address!r} is not host:port")
        return value

    def endpoints(self) -> list[tuple[str, int]]:
        pairs = (a.rpartition(":") for a in self.addresses)
        return [(host.strip("[]"), int(port)) for host, _, port in pairs]


class StateConfig(_Strict):
    """Shared state (single-use ids, revocations, rate limits). `redis` when running replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    kind: Literal["memory", "redis"] = "memory"
    url: str | None = Field(
        None, description="redis://host:port/db (loopback only) or rediss://; no password inline."
    )
    password_ref: SecretReference | None = Field(None, description="env:NAME or file:/path")
    tls_ca_file: Path | None = Field(None, description="CA bundle for a rediss:// server.")
    key_prefix: str = Field("broker:", pattern=r"^[A-Za-z0-9:_.{}-]{1,64}$")
    socket_timeout_seconds: float = Field(0.5, gt=0.0, le=30.0)
    connect_timeout_seconds: float = Field(0.5, gt=0.0, le=30.0)
    max_connections: int = Field(50, ge=1, le=10000)
    sentinel: SentinelConfig | None = Field(
        None, description="Reach the primary through Redis Sentinel instead of `url`."
    )
    min_replica_acks: int = Field(
        0,
        ge=0,
        le=5,
        description="Writes that must survive a failover (revocations, single-use ids) are "
        "answered only once this many replicas acknowledged them (Redis WAIT); fewer in time: "
        "refused (503).",
    )
    allow_memory_with_workers: bool = Field(
        False,
        description="Benchmarks only: accept kind memory with several workers, knowing that "
        "revocations, single-use ids and rate counters then hold per worker.",
    )

    @model_validator(mode="after")
    def _url(self) -> StateConfig:
        if self.kind == "memory":
            if self.url or self.password_ref or self.tls_ca_file or self.sentinel:
                raise ValueError(
                    "state: url, sentinel, password_ref and tls_ca_file need kind: redis"
                )
            return self
        if self.sentinel is not None:
            if self.url:
                raise ValueError("state: give either url or sentinel, not both")
            if not self.sentinel.tls:
                loopback = all(
                    is_loopback_url(f"redis://{host}:{port}")
                    for host, port in self.sentinel.endpoints()
                )
                if not loopback:
                    raise ValueError("state.sentinel: tls: true (plain text only on loopback)")
            if self.tls_ca_file and not self.sentinel.tls:
                raise ValueError("state.tls_ca_file needs state.sentinel.tls: true")
            return self
        if not self.url:
            raise ValueError("state: kind redis needs a url (or sentinel)")
        parts = urlsplit(self.url)
        _ = parts.port  # ValueError when the port is not a number in range
        if parts.scheme not in {"redis", "rediss"} or not parts.hostname:
            raise ValueError("state.url must be redis://host[:port][/db] or rediss://...")
        if parts.scheme == "redis" and not is_loopback_url(self.url):
            raise ValueError("state.url must use rediss:// (plain redis:// only on loopback)")
        if parts.password is not None or parts.query or parts.fragment:
            raise ValueError("state.url must not carry a password or options; use password_ref")
        if self.tls_ca_file and parts.scheme != "rediss":
            raise ValueError("state.tls_ca_file needs a rediss:// url")
        return self


class AuditS3Config(_Strict):
    """Batches of audit records as S3 objects under Object Lock (credentials: the AWS chain)."""

    bucket: str = Field(min_length=3, max_length=63, description="Created with Object Lock on.")
    prefix: str = Field("audit/", description="Key prefix; objects are <prefix><chain>/<seqs>.")
    region: str | None = None
    endpoint_url: str | None = Field(None, description="For S3-compatible stores and tests.")
    object_lock_mode: Literal["COMPLIANCE", "GOVERNANCE"] = "COMPLIANCE"
    retention_days: int = Field(365, ge=1, le=36500)
    batch_size: int = Field(100, ge=1, le=100000, description="Upload at this many records...")
    batch_age_seconds: float = Field(5.0, gt=0.0, description="...or when the oldest is this old.")
    timeout_seconds: float = Field(10.0, gt=0.0)

    @field_validator("endpoint_url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        return None if value is None else require_https_unless_loopback(value)


class AuditConfig(_Strict):
    """Where decision records go (several at once). See README, "The audit trail"."""

    stdout: bool = Field(True, description="JSON lines on standard output.")
    file: Path | None = Field(
        None, description="Append-only JSON-lines file, durable before each answer."
    )
    fsync: bool = Field(True, description="fdatasync records before the response is sent.")
    group_commit: bool = Field(
        True,
        description="One fdatasync covers every record written meanwhile; responses still wait "
        "for their records to be durable.",
    )
    group_commit_window_ms: float = Field(
        0.5,
        ge=0.0,
        le=50.0,
        description="Group commit on a fast disk: a worker syncs at most once per this window, "
        "on its event loop. Longer windows mean fewer syncs and a longer wait per answer.",
    )
    inline_sync_max_ms: float = Field(
        1.0,
        ge=0.0,
        le=50.0,
        description="Syncs that take longer than this (a moving average) run on a background "
        "thread instead, so a slow disk never stalls the event loop; 0: always on the thread.",
    )
    s3: AuditS3Config | None = None
    checkpoint_every_records: int = Field(
        1000,
        ge=0,
        description="Sign an audit.checkpoint (JWS with the token signing key) once this many "
        "records are not yet vouched for (0: off)...",
    )
    checkpoint_interval_seconds: float = Field(
        10.0,
        ge=0.0,
        description="...or once the oldest of them is this old (0: off). Bounds the tail a "
        "crash or a cut can leave unvouched.",
    )


class TracingConfig(_Strict):
    """OpenTelemetry tracing (off by default). See README, "Logs and traces"."""

    enabled: bool = False
    exporter: Literal["otlp", "console"] = Field(
        "otlp", description="otlp: OTLP/HTTP protobuf to `endpoint`; console: print spans."
    )
    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP traces URL (e.g. https://collector:4318/v1/traces); "
        "defaults to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or http://localhost:4318/v1/traces.",
    )
    ca_file: Path | None = Field(None, description="CA bundle for an https collector.")
    service_name: str = Field("agent-identity-broker", min_length=1, max_length=128)
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="Of traces the broker starts.")
    export_interval_seconds: float = Field(2.0, gt=0.0, le=60.0)
    timeout_seconds: float = Field(5.0, gt=0.0, le=60.0)

    @field_validator("endpoint")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        return None if value is None else require_https_unless_loopback(value)


class BrokerSettings(BaseSettings):
    """Everything `broker serve` needs. See README, "Configuration reference"."""

    model_config = SettingsConfigDict(
        env_prefix="BROKER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    issuer: str = Field("http://127.0.0.1:8080", description="This broker's issuer URL.")
    policy_dir: Path = Path("policies")
    policy_reload_interval_seconds: float = Field(2.0, ge=0.0, description="0 stops polling.")
    signing_keys: SigningKeysConfig = SigningKeysConfig()
    tokens: TokenLifetimes = TokenLifetimes()
    identity_providers: list[IdentityProviderConfig] = Field(default_factory=list)
    workload_issuers: list[IdentityProviderConfig] = Field(default_factory=list)
    secret_backends: list[SecretBackendConfig] = Field(
        default_factory=list, description="Where provider credentials are read from."
    )
    credential_cache_max_entries: int = Field(1024, ge=1)
    readyz_backend_check_interval_seconds: float = Field(
        5.0, ge=0.0, description="/readyz remembers each secret backend's answer this long."
    )
    http: HttpConfig = HttpConfig()
    client_authentication: ClientAuthConfig = ClientAuthConfig()
    allow_development_components: bool = Field(
        False, description="Permit the development IdP (kind: dev). Never in production."
    )
    dev_idp: DevIdpConfig = DevIdpConfig()
    dev_openbao: DevOpenBaoConfig = DevOpenBaoConfig()
    approvals: ApprovalsConfig = ApprovalsConfig()
    dpop: DPoPConfig = DPoPConfig()
    id_jag: IdJagConfig = IdJagConfig()
    usage: UsageConfig = UsageConfig()
    state: StateConfig = StateConfig()
    audit: AuditConfig = AuditConfig()
    notifications: NotificationSettings = NotificationSettings()
    expose_error_debug: bool = Field(False, description="Add private error detail to responses.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = Field(
        "json", description="Operational logs on stderr: JSON lines (with request ids) or text."
    )
    tracing: TracingConfig = TracingConfig()

    @field_validator("issuer")
    @classmethod
    def _issuer_https(cls, value: str) -> str:
        require_https_unless_loopback(value)
        return value.rstrip("/")

    def per_worker_state_problem(self, workers: int | None = None) -> str | None:
        """Why `workers` (default http.workers) cannot share this state, or None."""
        workers = workers or self.http.workers
        if workers <= 1 or self.state.kind != "memory" or self.state.allow_memory_with_workers:
            return None
        return (
            f"{workers} workers with state.kind: memory: each worker would keep its own "
            "revocations, single-use ids and rate counters (a revocation would reach one worker, "
            "a client assertion could be replayed at another). Set state.kind: redis (and "
            "state.url), or run one worker (http.workers: 1)"
        )

    @model_validator(mode="after")
    def _unique_and_safe(self) -> BrokerSettings:
        problem = self.per_worker_state_problem()
        if problem is not None:
            raise ValueError(problem)
        names = [p.name for p in (*self.identity_providers, *self.workload_issuers)]
        if len(names) != len(set(names)):
            raise ValueError("identity provider and workload issuer names must be unique")
        backends = [b.name for b in self.secret_backends]
        if len(backends) != len(set(backends)):
            raise ValueError("secret backend names must be unique")
        unknown = set(self.usage.alert_channels) - set(self.notifications.channels)
        if unknown:
            raise ValueError(
                f"usage.alert_channels: no notification channel {sorted(unknown)[0]!r} is "
                "configured"
            )
        # JWT issuers and SAML entity ids are routed apart (one IdP may use one name for both).
        for family in (
            [p.issuer for p in self.identity_providers if p.kind != "saml"],
            [p.issuer for p in self.identity_providers if p.kind == "saml"],
        ):
            if len(family) != len(set(family)):
                raise ValueError("two identity providers of the same protocol share an issuer")
        jwt_issuers = {p.issuer for p in self.identity_providers if p.kind != "saml"}
        if self.issuer in jwt_issuers or self.issuer in {w.issuer for w in self.workload_issuers}:
            raise ValueError("the broker's own issuer cannot also be a trusted identity provider")
        for idp in self.identity_providers:
            if idp.kind in {"kubernetes", "spiffe"}:
                raise ValueError(f"{idp.name}: workload kinds belong in workload_issuers")
        oidc = {p.name: p for p in self.identity_providers if p.kind in {"oidc", "dev"}}
        for sign_in in self.approvals.sign_in:
            idp_config = oidc.get(sign_in.idp)
            if idp_config is None:
                raise ValueError(
                    f"approvals.sign_in: {sign_in.idp!r} is not an OIDC identity provider"
                )
            if sign_in.client_id not in idp_config.client_ids:
                raise ValueError(
                    f"approvals.sign_in: client_id {sign_in.client_id!r} is not among the "
                    f"client_ids of identity provider {sign_in.idp!r} (its ID tokens would be "
                    "refused)"
                )
        for wl in self.workload_issuers:
            if wl.kind not in {"kubernetes", "spiffe"}:
                raise ValueError(f"{wl.name}: workload_issuers take kind kubernetes or spiffe")
            if not wl.audiences:
                raise ValueError(f"{wl.name}: a workload issuer needs audiences")
        return self

    @property
    def uses_development_components(self) -> bool:
        return any(p.kind == "dev" for p in self.identity_providers) or any(
            b.kind == "file" for b in self.secret_backends
        )

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/oauth2/token"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("yaml_file") is not None:
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> BrokerSettings:
    """Load settings from an optional YAML file; environment variables win over the file."""
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"configuration file {config_file} does not exist")

    class _FromFile(BrokerSettings):
        model_config = SettingsConfigDict(yaml_file=config_file)

    loaded = _FromFile(**overrides)
    return BrokerSettings.model_validate(loaded.model_dump())
