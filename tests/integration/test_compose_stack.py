"""The deployable stack (Dockerfile, docker-compose.yml, deploy/) checked at configuration level.

No container engine is needed (none is assumed; images are never pulled), but nothing is mocked:
docker compose itself resolves docker-compose.yml, the broker's own settings loader reads
deploy/broker.yaml under the environment compose gives the replicas, the policy is the shipped
policies/ directory, and the init script really generates the CA, certificates, realms,
secrets and signing key into a temporary directory.

docker compose comes from the machine (`docker compose` or `docker-compose`) or from
`make compose` (.venv/bin/docker-compose); without one these tests fail, they never skip.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store

from broker.policy import load_policy, load_policy_tests, run_policy_tests
from broker.settings import BrokerSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
BROKER_CONFIG = DEPLOY / "broker.yaml"
NGINX_CONF = DEPLOY / "nginx.conf"
PEOPLE_REALM = DEPLOY / "keycloak" / "realm-agents.json"
PREPARE = DEPLOY / "init" / "prepare.py"
POLICIES = ROOT / "policies"

REPLICAS = ("broker-1", "broker-2")
SERVICES = {
    "init", *REPLICAS, "lb", "keycloak", "openbao", "openbao-init", "localstack", "redis"
}
ONE_SHOT = {"init", "openbao-init"}
OIDC_IDP, SAML_IDP = "keycloak", "keycloak-saml"


# ---------------------------------------------------------------------------------- fixtures


def compose_command() -> list[str]:
    """`docker compose`, `docker-compose` on PATH, or the one `make compose` installs."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append([str(shutil.which("docker-compose"))])
    candidates.append([str(Path(sys.executable).parent / "docker-compose")])
    candidates.append([str(ROOT / ".venv" / "bin" / "docker-compose")])
    for command in candidates:
        try:
            result = subprocess.run(
                [*command, "version"], capture_output=True, text=True, timeout=30, check=False
            )
        except OSError:
            continue
        if result.returncode == 0:
            return command
    pytest.fail(
        "no docker compose: neither `docker compose`, `docker-compose` nor "
        ".venv/bin/docker-compose works; run `make compose` (make test does)"
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as docker compose itself resolves it (anchors, merges, defaults)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    result = subprocess.run(
        [
            *compose_command(),
            "--project-directory",
            str(ROOT),
            "-f",
            str(COMPOSE_FILE),
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"docker compose config refused the file:\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture
def replica_settings(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, BrokerSettings]]:
    """deploy/broker.yaml loaded by the broker's loader, once per replica, under exactly the
    environment compose sets for that replica (and nothing from this machine's BROKER_*)."""
    loaded = {}
    for name in REPLICAS:
        with monkeypatch.context() as patch:
            for key in [k for k in os.environ if k.startswith("BROKER_")]:
                patch.delenv(key)
            for key, value in services[name]["environment"].items():
                patch.setenv(key, value)
            loaded[name] = load_settings(BROKER_CONFIG)
    yield loaded


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The init service's script, run for real into a temporary directory."""
    out = tmp_path_factory.mktemp("stack-init")
    run_prepare(out)
    return out


def run_prepare(out: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(PREPARE), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def bind_mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in service.get("volumes", []) if v["type"] == "bind"]


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Named volume -> target, for one service."""
    return {v["source"]: v["target"] for v in service.get("volumes", []) if v["type"] == "volume"}


def mount_targets(service: dict[str, Any]) -> list[str]:
    return [v["target"] for v in service.get("volumes", [])]


def is_under_a_mount(path: str, service: dict[str, Any]) -> bool:
    return any(path == t or path.startswith(t.rstrip("/") + "/") for t in mount_targets(service))


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


def realm(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def realm_issuer(services: dict[str, Any], realm_name: str) -> str:
    hostname = services["keycloak"]["environment"]["KC_HOSTNAME"].rstrip("/")
    return f"{hostname}/realms/{realm_name}"


def idp(settings: BrokerSettings, name: str) -> Any:
    matches = [p for p in settings.identity_providers if p.name == name]
    assert len(matches) == 1, f"deploy/broker.yaml has no identity provider {name!r}"
    return matches[0]


def upstream_servers(conf: str, upstream: str) -> list[str]:
    block = re.search(r"upstream\s+" + re.escape(upstream) + r"\s*\{(.*?)\}", conf, re.S)
    assert block, f"nginx.conf has no upstream {upstream!r}"
    return re.findall(r"^\s*server\s+(\S+?)(?:\s[^;]*)?;", block.group(1), re.M)


# ---------------------------------------------------------------------------------- compose


def test_compose_accepts_the_file_and_defines_the_whole_stack(services: dict[str, Any]) -> None:
    assert set(services) == SERVICES
    images = {name: service["image"] for name, service in services.items()}
    assert images["keycloak"].startswith("quay.io/keycloak/keycloak:")
    assert images["openbao"].startswith("openbao/openbao:")
    assert images["openbao-init"] == images["openbao"]
    assert images["localstack"].startswith("localstack/localstack:")
    assert images["redis"].startswith("redis:")
    assert images["lb"].startswith("nginx:")
    # Keycloak runs in production mode and imports the realms the init service rendered.
    assert services["keycloak"]["command"][:1] == ["start"]
    assert "--import-realm" in services["keycloak"]["command"]
    assert volume_mounts(services["keycloak"])["keycloak-import"] == "/opt/keycloak/data/import"


def test_two_broker_replicas_share_image_configuration_keys_and_state(
    services: dict[str, Any],
) -> None:
    first, second = (services[name] for name in REPLICAS)
    assert first["image"] == second["image"] == services["init"]["image"]
    assert first["build"]["context"] == str(ROOT)
    for key in ("entrypoint", "command", "volumes", "user", "read_only", "depends_on"):
        assert first[key] == second[key], key
    assert first["command"][:2] == ["broker", "serve"]
    # The same environment except the audit file: two processes, two hash chains, two files.
    env1, env2 = dict(first["environment"]), dict(second["environment"])
    assert env1.pop("BROKER_AUDIT__FILE") != env2.pop("BROKER_AUDIT__FILE")
    assert env1 == env2
    mounts = volume_mounts(first)
    assert mounts["broker-keys"] == "/var/lib/broker/keys"
    keys_mount = next(v for v in first["volumes"] if v.get("source") == "broker-keys")
    assert keys_mount.get("read_only") is True  # replicas never write keys: no race
    assert first["user"] != "0:0" and not first["user"].startswith("0")


def test_every_long_running_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name} has no healthcheck"
    broker_check = services["broker-1"]["healthcheck"]["test"]
    # `broker healthcheck` reads the replica's own configuration (HTTPS, its port): readiness.
    assert broker_check == [
        "CMD", "broker", "healthcheck", "--config", "/etc/broker/broker.yaml", "--ready",
    ]  # fmt: skip


def test_start_order_waits_for_what_each_service_needs(services: dict[str, Any]) -> None:
    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    for replica in REPLICAS:
        assert conditions(replica) == {
            "init": "service_completed_successfully",
            "openbao-init": "service_completed_successfully",
            "redis": "service_healthy",
            "localstack": "service_healthy",
            "keycloak": "service_healthy",
        }
    assert conditions("lb") == {r: "service_healthy" for r in REPLICAS}
    assert conditions("openbao-init") == {"openbao": "service_healthy"}
    for name in ("keycloak", "openbao", "localstack", "redis"):
        assert conditions(name) == {"init": "service_completed_successfully"}
    assert "depends_on" not in services["init"]


def test_every_bind_mounted_file_exists_in_the_repository(services: dict[str, Any]) -> None:
    sources = set()
    for name, service in services.items():
        for mount in bind_mounts(service):
            source = Path(mount["source"])
            assert source.is_relative_to(ROOT), f"{name} mounts {source} from outside the repo"
            assert source.exists(), f"{name} mounts {source}, which does not exist"
            assert mount.get("read_only") is True, f"{name} mounts {source} writable"
            sources.add(source.relative_to(ROOT).as_posix())
    assert {
        "deploy/broker.yaml",
        "deploy/nginx.conf",
        "deploy/redis/redis.conf",
        "deploy/openbao",
        "policies",
        "deploy/localstack/ready.d",
    } <= sources
    # LocalStack executes its ready hooks directly: they must be executable.
    for hook in (DEPLOY / "localstack" / "ready.d").iterdir():
        assert hook.stat().st_mode & stat.S_IXUSR, hook


def test_the_stack_mounts_the_security_teams_policies_not_a_copy(
    services: dict[str, Any],
) -> None:
    for name in (*REPLICAS, "init"):
        policy_mounts = [
            m for m in bind_mounts(services[name]) if m["target"] == "/etc/broker/policies"
        ]
        assert [Path(m["source"]) for m in policy_mounts] == [POLICIES], name
    assert not list(DEPLOY.rglob("bindings.yaml")) and not list(DEPLOY.rglob("agents.yaml"))


def test_compose_writes_no_secret_inline(services: dict[str, Any]) -> None:
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.I)
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if secretish.search(key):
                # Only pointers to files are allowed under a secret-sounding name.
                assert str(value).startswith("/"), f"{name}: {key} is set inline"
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert "demo-only-" not in text and "requirepass" not in text


def test_service_users_match_the_owners_the_init_script_gives_their_files(
    services: dict[str, Any],
) -> None:
    sys.path.insert(0, str(PREPARE.parent))
    try:
        import prepare  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(PREPARE.parent))
    for name, owner in (
        ("broker-1", "broker"),
        ("broker-2", "broker"),
        ("keycloak", "keycloak"),
        ("redis", "redis"),
        ("openbao", "openbao"),
    ):
        uid, gid = prepare.OWNERS[owner]
        assert services[name]["user"] == f"{uid}:{gid}", name
    # The Dockerfile's user is the broker owner too.
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert f"--uid {prepare.OWNERS['broker'][0]}" in dockerfile
    # Each TLS volume feeds exactly the service its certificate names.
    for leaf in prepare.LEAVES:
        volume = f"tls-{leaf.service}"
        users = [n for n, s in services.items() if volume in volume_mounts(s) and n != "init"]
        expected = sorted(REPLICAS) if leaf.service == "broker" else [leaf.service]
        assert sorted(users) == expected, (volume, users)
        assert volume_mounts(services["init"])[volume] == f"/out/tls/{leaf.service}"


# ---------------------------------------------------------------------------------- broker


def test_broker_config_loads_under_each_replicas_environment(
    replica_settings: dict[str, BrokerSettings], services: dict[str, Any]
) -> None:
    for name, settings in replica_settings.items():
        assert settings.audit.file == Path(f"/var/log/broker/{name}.jsonl")
        assert settings.audit.stdout is True  # the env override merged, it did not replace
        assert settings.state.kind == "redis"
        assert settings.state.url is not None and settings.state.url.startswith("rediss://")
        assert settings.signing_keys.generate_if_missing is False
        assert settings.uses_development_components is False
        assert settings.http.host == "0.0.0.0"  # reached only through the LB
        # Every file the broker reads is under a volume the replica mounts.
        service = services[name]
        paths = [
            str(settings.policy_dir),
            str(settings.signing_keys.directory),
            str(settings.state.tls_ca_file),
            str(settings.audit.file),
            str(settings.http.tls_cert_file),
            str(settings.http.tls_key_file),
        ]
        refs = [settings.state.password_ref]
        for backend in settings.secret_backends:
            if backend.kind == "vault":
                paths.append(str(backend.tls_ca_file))
                refs.append(backend.auth.token_ref if backend.auth.method == "token" else None)
        refs += [p.idp_certificate_ref for p in settings.identity_providers if p.kind == "saml"]
        for ref in refs:
            assert ref is not None and ref.startswith("file:/"), ref
            paths.append(ref.removeprefix("file:"))
        for key in ("SSL_CERT_FILE", "AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE"):
            paths.append(service["environment"][key])
        paths.append(service["environment"]["AWS_SHARED_CREDENTIALS_FILE"])
        for path in paths:
            assert is_under_a_mount(path, service), f"{name}: {path} is not mounted"


def test_broker_config_points_at_the_stacks_services_over_tls(
    replica_settings: dict[str, BrokerSettings], services: dict[str, Any]
) -> None:
    settings = replica_settings["broker-1"]
    hosts = set(services)
    aliases = set(services["lb"]["networks"]["default"]["aliases"])
    assert settings.issuer.startswith("https://") and host_of(settings.issuer) in aliases
    assert "8443:8443" in {f"{p['published']}:{p['target']}" for p in services["lb"]["ports"]}
    for backend in settings.secret_backends:
        url = backend.address if backend.kind == "vault" else backend.endpoint_url
        assert url is not None and url.startswith("https://")
        assert host_of(url) in hosts, url
    assert settings.state.url is not None and host_of(settings.state.url) in hosts
    for provider in settings.identity_providers:
        assert host_of(provider.issuer) in hosts


def test_the_settings_loader_still_refuses_plain_redis_over_the_network(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stack uses TLS because the broker insists, not because its checks were loosened."""
    for key, value in services["broker-1"]["environment"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("BROKER_STATE__URL", "redis://redis:6379/0")
    with pytest.raises(ValueError, match="rediss://"):
        load_settings(BROKER_CONFIG)


def test_policy_and_broker_config_agree(replica_settings: dict[str, BrokerSettings]) -> None:
    settings = replica_settings["broker-1"]
    policy = load_policy(POLICIES).policy
    backends = {b.name for b in settings.secret_backends}
    for name, credential in policy.credentials.items():
        assert credential.backend in backends, f"credential {name}: no backend"
    configured_idps = {p.name for p in settings.identity_providers}
    bound = {i for b in load_bindings()["group_bindings"] for i in b.idps} - {"dev"}
    assert bound == configured_idps == {OIDC_IDP, SAML_IDP}


def load_bindings() -> dict[str, list[Any]]:
    from broker.policy.model import GroupBinding, PersonBinding

    raw = yaml.safe_load((POLICIES / "bindings.yaml").read_text(encoding="utf-8"))
    return {
        "group_bindings": [GroupBinding(**b) for b in raw["group_bindings"]],
        "person_bindings": [PersonBinding(**b) for b in raw["person_bindings"]],
    }


def test_load_balancer_routes_to_both_replicas(
    replica_settings: dict[str, BrokerSettings], services: dict[str, Any]
) -> None:
    conf = NGINX_CONF.read_text(encoding="utf-8")
    port = replica_settings["broker-1"].http.port
    assert sorted(upstream_servers(conf, "brokers")) == [f"{r}:{port}" for r in REPLICAS]
    assert re.search(r"proxy_pass\s+https://brokers;", conf)  # TLS to the replicas too
    assert re.search(r"proxy_ssl_verify\s+on;", conf)
    assert re.search(r"proxy_ssl_trusted_certificate\s+/etc/nginx/tls/ca.crt;", conf)
    name = re.search(r"proxy_ssl_name\s+(\S+);", conf)
    assert name and name.group(1) == "broker-replica"
    settings = replica_settings["broker-1"]
    assert settings.http.tls_cert_file and settings.http.tls_key_file
    assert volume_mounts(services["broker-1"])["tls-broker"] == str(
        settings.http.tls_cert_file.parent
    )
    assert re.search(r"location\s*=\s*/metrics\s*\{\s*return 404;", conf)
    assert re.search(r"listen\s+8443\s+ssl;", conf)
    lb_mounts = {m["target"]: Path(m["source"]) for m in bind_mounts(services["lb"])}
    assert lb_mounts["/etc/nginx/nginx.conf"] == NGINX_CONF
    assert "/lb-healthz" in " ".join(services["lb"]["healthcheck"]["test"])


def test_dockerfile_runs_broker_serve_as_a_non_root_user_without_secrets() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f.startswith("python:3.11-slim") for f in froms)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in {"root", "0"}
    assert re.search(r'^HEALTHCHECK .*?\["broker", "healthcheck", "--config"', text, re.M | re.S)
    assert "libxmlsec1" in text and "pip install" in text
    assert re.search(r'^ENTRYPOINT \["broker"\]', text, re.M)
    assert re.search(r'^CMD \["serve"', text, re.M)
    for line in re.findall(r"^(?:ENV|ARG)\s+.*$", text, re.M):
        assert not re.search(r"PASSWORD|SECRET|TOKEN", line, re.I), line
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # nothing enters the build context unless listed
    assert {"!var/", "!deploy/", "!policies/", "!.venv/"}.isdisjoint(patterns)


# ---------------------------------------------------------------------------------- Keycloak


def test_oidc_realm_matches_the_broker_and_the_policy(
    replica_settings: dict[str, BrokerSettings], services: dict[str, Any]
) -> None:
    people = realm(PEOPLE_REALM)
    provider = idp(replica_settings["broker-1"], OIDC_IDP)
    assert provider.kind == "oidc" and provider.preset == "keycloak"
    assert provider.issuer == realm_issuer(services, people["realm"])
    clients = [c for c in people["clients"] if c["protocol"] == "openid-connect"]
    assert [c["clientId"] for c in clients] == provider.client_ids
    mappers = {m["protocolMapper"]: m["config"] for m in clients[0]["protocolMappers"]}
    groups_mapper = mappers["oidc-group-membership-mapper"]
    assert groups_mapper["claim.name"] == "groups" and groups_mapper["id.token.claim"] == "true"
    assert mappers["oidc-audience-mapper"]["included.custom.audience"] in provider.audiences

    realm_groups = {g["name"] for g in people["groups"]}
    bindings = load_bindings()
    bound = {b.group for b in bindings["group_bindings"] if OIDC_IDP in b.idps}
    assert bound and bound <= realm_groups
    user_ids = {u["id"] for u in people["users"]}
    persons = {b.subject for b in bindings["person_bindings"] if b.idp == OIDC_IDP}
    assert persons and persons <= user_ids  # OIDC subjects are Keycloak user ids


def test_realm_people_are_demo_only_and_in_groups_that_exist() -> None:
    people = realm(PEOPLE_REALM)
    paths = {"/" + g["name"] for g in people["groups"]}
    assert len(people["users"]) >= 4
    for user in people["users"]:
        assert set(user["groups"]) <= paths, user["username"]
        (credential,) = user["credentials"]
        assert credential["value"].startswith("demo-only-"), user["username"]
        assert credential["temporary"] is False
        assert user["emailVerified"] is True and user["firstName"] and user["lastName"]
    assert "DEMO ONLY" in people["displayName"]
    # Every group is somebody's, so each binding can be tried with a real person.
    assert {g for u in people["users"] for g in u["groups"]} == paths


def test_the_same_realm_serves_saml_to_the_broker(
    replica_settings: dict[str, BrokerSettings], services: dict[str, Any]
) -> None:
    people = realm(PEOPLE_REALM)
    provider = idp(replica_settings["broker-1"], SAML_IDP)
    assert provider.kind == "saml"
    # One realm: its SAML entity id is its OIDC issuer (the broker routes the two apart).
    assert provider.issuer == realm_issuer(services, people["realm"])
    assert provider.issuer == idp(replica_settings["broker-1"], OIDC_IDP).issuer
    (client,) = [c for c in people["clients"] if c["protocol"] == "saml"]
    assert client["clientId"] == provider.sp_entity_id
    attributes = client["attributes"]
    assert attributes["saml_assertion_consumer_url_post"] == provider.acs_url
    assert provider.acs_url in client["redirectUris"]
    assert attributes["saml.assertion.signature"] == "true"  # the broker needs signed assertions
    assert attributes["saml.signature.algorithm"] == "RSA_SHA256"  # SHA-1 is refused
    assert attributes["saml.encrypt"] == "false"  # the broker holds no decryption key
    assert attributes["saml_name_id_format"] != "transient"  # refused as a subject
    mapper = next(m for m in client["protocolMappers"] if m["name"] == "groups")
    assert mapper["config"]["attribute.name"] == "groups"  # saml_preset generic reads it
    # Full paths, as over OIDC: a group means the same whichever protocol signed the person in.
    assert mapper["config"]["full.path"] == "true"
    # The broker pins the certificate the init service generated for this realm.
    assert provider.idp_certificate_ref == "file:/etc/broker/pki/keycloak-saml-signing.crt"


def test_policy_tests_cover_keycloak_people_and_pass() -> None:
    policy = load_policy(POLICIES).policy
    cases = [
        (f, c)
        for f, c in load_policy_tests(POLICIES)
        if getattr(c, "person", "").startswith("keycloak")
    ]
    assert {c.person.split("/")[0] for _, c in cases} == {OIDC_IDP, SAML_IDP}
    results = run_policy_tests(policy, cases)
    assert [r.case.name for r in results if not r.passed] == []
    assert any(r.case.expect_granted for r in results)


# ---------------------------------------------------------------------------------- init


def test_init_issues_certificates_that_verify_for_the_compose_hostnames(
    prepared: Path, services: dict[str, Any]
) -> None:
    ca = x509.load_pem_x509_certificate((prepared / "public" / "ca.crt").read_bytes())
    store = Store([ca])
    aliases = set(services["lb"]["networks"]["default"]["aliases"])
    expected = {
        "keycloak": {"keycloak"},
        "redis": {"redis"},
        "openbao": {"openbao"},
        "localstack": {"localstack"},
        "lb": {"lb", *aliases},
    }
    for service, names in expected.items():
        assert service in services
        cert = x509.load_pem_x509_certificate((prepared / "tls" / service / "tls.crt").read_bytes())
        key = serialization.load_pem_private_key(
            (prepared / "tls" / service / "tls.key").read_bytes(), password=None
        )
        assert key.public_key() == cert.public_key()
        for name in (*names, "localhost"):
            verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name))
            chain = verifier.verify(cert, [])  # raises unless CA-signed and named for `name`
            assert chain[-1] == ca
        with pytest.raises(x509.verification.VerificationError):
            PolicyBuilder().store(store).build_server_verifier(
                x509.DNSName("not-in-the-stack")
            ).verify(cert, [])
        assert (prepared / "tls" / service / "ca.crt").read_bytes() == ca.public_bytes(
            serialization.Encoding.PEM
        )
        assert stat.S_IMODE((prepared / "tls" / service / "tls.key").stat().st_mode) == 0o400
        assert cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=300)
    # The replicas' shared certificate, verified by nginx under `broker-replica`.
    replica = x509.load_pem_x509_certificate((prepared / "tls" / "broker" / "tls.crt").read_bytes())
    for name in ("broker-replica", *REPLICAS):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name)).verify(replica, [])
    server_pem = (prepared / "tls" / "localstack" / "server.pem").read_bytes()
    assert b"PRIVATE KEY" in server_pem and b"CERTIFICATE" in server_pem


def test_init_renders_the_realm_with_the_pinned_signing_key(prepared: Path) -> None:
    people = realm(PEOPLE_REALM)
    (imported,) = (prepared / "keycloak-import").iterdir()  # one realm file
    rendered = realm(imported)
    assert {k: v for k, v in rendered.items() if k != "components"} == people
    bindings = load_bindings()
    saml_groups = {b.group for b in bindings["group_bindings"] if SAML_IDP in b.idps}
    assert saml_groups and saml_groups <= {g["name"] for g in rendered["groups"]}
    usernames = {u["username"] for u in rendered["users"]}
    persons = {b.subject for b in bindings["person_bindings"] if b.idp == SAML_IDP}
    assert persons and persons <= usernames  # SAML subjects are usernames (NameID)

    providers = rendered["components"]["org.keycloak.keys.KeyProvider"]
    (signing,) = [p for p in providers if p["providerId"] == "rsa"]
    pinned = x509.load_pem_x509_certificate(
        (prepared / "public" / "keycloak-saml-signing.crt").read_bytes()
    )
    cert = x509.load_der_x509_certificate(base64.b64decode(signing["config"]["certificate"][0]))
    key = serialization.load_der_private_key(
        base64.b64decode(signing["config"]["privateKey"][0]), password=None
    )
    assert cert == pinned and key.public_key() == pinned.public_key()
    priorities = {p["name"]: int(p["config"].get("priority", ["0"])[0]) for p in providers}
    assert priorities["demo-realm-signing"] == max(priorities.values())
    # The private key stays out of what everyone can read.
    assert b"PRIVATE" not in b"".join(p.read_bytes() for p in (prepared / "public").iterdir())


def test_init_generates_every_secret_the_stack_references(prepared: Path) -> None:
    broker_secrets = prepared / "secrets" / "broker"
    policy = load_policy(POLICIES).policy
    clients = [
        *(a.spec.authentication for a in policy.agents.values()),
        *(g.authentication for g in policy.gateways.values()),
        *(a.authentication for a in policy.admins.values()),
        *(r.authentication for r in policy.resource_servers.values()),
    ]
    names = {
        c.secret_ref.removeprefix("env:")
        for c in clients
        if getattr(c, "secret_ref", None) and c.secret_ref.startswith("env:")
    }
    generated = {p.name for p in (broker_secrets / "env").iterdir()}
    assert names and generated == names
    values = [(broker_secrets / "env" / n).read_text().strip() for n in names]
    assert len(set(values)) == len(values) and all(len(v) >= 32 for v in values)

    password = (broker_secrets / "redis-password").read_text().strip()
    assert (prepared / "secrets" / "redis" / "password").read_text().strip() == password
    conf = (prepared / "secrets" / "redis" / "password.conf").read_text()
    assert conf == f"requirepass {password}\n"
    assert "include /run/redis-secrets/password.conf" in (
        DEPLOY / "redis" / "redis.conf"
    ).read_text(encoding="utf-8")
    assert (prepared / "secrets" / "openbao" / "root-token").read_text().strip()
    assert "aws_secret_access_key" in (broker_secrets / "aws-credentials").read_text()
    for path in (prepared / "secrets").rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o400, path


def test_init_is_idempotent_and_makes_exactly_one_signing_key(
    prepared: Path, tmp_path: Path
) -> None:
    out = tmp_path / "again"
    shutil.copytree(prepared, out)
    keys_before = sorted(p.name for p in (out / "keys").glob("*.key.json"))
    assert len(keys_before) == 1
    watched = [
        out / "tls" / "redis" / "tls.crt",
        out / "public" / "ca.crt",
        out / "secrets" / "broker" / "env" / "TRIAGE_AGENT_SECRET",
        out / "public" / "keycloak-saml-signing.crt",
    ]
    before = [p.read_bytes() for p in watched]
    result = run_prepare(out)
    assert "issued: none" in result.stdout and "kept the existing keys" in result.stdout
    assert sorted(p.name for p in (out / "keys").glob("*.key.json")) == keys_before
    assert [p.read_bytes() for p in watched] == before
    # And the key is one the broker itself can use.
    from broker.clock import SystemClock
    from broker.tokens import Keyring

    keyring = Keyring(
        out / "keys",
        algorithm="ES256",
        clock=SystemClock(),
        publish_grace_seconds=60,
        generate_if_missing=False,
    )
    assert keyring.active.kid == keys_before[0].removesuffix(".key.json")
