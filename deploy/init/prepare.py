"""Prepare the volumes of the demo stack (docker-compose.yml), once, before anything else starts.

The `init` service runs this as root in the broker image (which has `cryptography` and the broker
package). Every step keeps what already exists, so `docker compose up` can run it again:

  <out>/ca/                   the private CA key and the realm's signing key (init only)
  <out>/public/               ca.crt and the realm's signing certificate (everyone, read-only)
  <out>/tls/<service>/        tls.crt, tls.key and ca.crt for one service (server.pem for
                              LocalStack), owned by the uid that service runs as
  <out>/keycloak-import/      the realm file Keycloak imports at start (with the signing key)
  <out>/secrets/<consumer>/   generated secrets: the policy's client secrets (one file per
                              `env:` name), the Redis password, OpenBao's dev root token
  <out>/keys/                 the broker's first signing key (the replicas never generate one)
  <out>/audit/                where the replicas append their audit trails

Why here and not in the services: a compose network is not loopback, so the broker insists on
TLS to every backend (broker/urls.py); one private CA lets every service trust every other one;
and generating the signing key once, before the replicas start, means two replicas can never
race to create different first keys.

Nothing secret is printed. Run `python deploy/init/prepare.py --out DIR` anywhere to inspect
the result; `--chown` (root only) hands each directory to its service's uid.
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime as dt
import ipaddress
import json
import os
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEPLOY_DIR = Path(__file__).resolve().parents[1]

# The uid:gid each service runs as in docker-compose.yml (its `user:`); tests check they agree.
OWNERS: dict[str, tuple[int, int]] = {
    "broker": (10001, 10001),  # the Dockerfile's `broker` user
    "keycloak": (1000, 0),  # the Keycloak image's user
    "redis": (999, 999),  # the redis (Debian) image's `redis` user
    "openbao": (10200, 10200),  # any fixed uid: the dev server keeps nothing on disk
    "localstack": (0, 0),  # LocalStack runs as root
    "lb": (0, 0),  # the nginx master reads its key as root, then drops privileges
}


@dataclass(frozen=True)
class Leaf:
    """A server certificate: the compose service (and network aliases) it answers as."""

    service: str
    dns_names: tuple[str, ...]


# Every leaf also carries localhost and 127.0.0.1, so that healthchecks inside a container
# (redis-cli, bao status) verify the same certificate that peers on the network see.
LEAVES: tuple[Leaf, ...] = (
    Leaf("keycloak", ("keycloak",)),
    Leaf("redis", ("redis",)),
    Leaf("openbao", ("openbao",)),
    Leaf("localstack", ("localstack", "localhost.localstack.cloud")),
    Leaf("lb", ("lb", "broker")),  # `broker` is the LB's network alias: the issuer's host
    # The replicas share one certificate; nginx verifies it under the name `broker-replica`.
    Leaf("broker", ("broker-replica", "broker-1", "broker-2")),
)
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1",)

CA_NAME = "agent-identity-broker demo CA (DEMO ONLY)"
CA_DAYS = 3650
LEAF_DAYS = 397
RENEW_WITHIN = dt.timedelta(days=30)

PEOPLE_REALM = "realm-agents.json"
SAML_SIGNING_CERT = "keycloak-saml-signing.crt"


# ---------------------------------------------------------------------------------- files


def _write(path: Path, data: bytes, *, mode: int, owner: tuple[int, int] | None) -> None:
    """Write atomically with `mode` from the start (a key is never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, mode)  # exactly `mode`: the umask (077 here) must not narrow public files
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    if owner is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, path)


def _own_tree(directory: Path, owner: tuple[int, int] | None, *, mode: int = 0o750) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(mode)
    if owner is None:
        return
    for path in (directory, *directory.rglob("*")):
        os.chown(path, *owner, follow_symlinks=False)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _self_signed(key: rsa.RSAPrivateKey, common_name: str) -> x509.CertificateBuilder:
    """A builder for a certificate `key` issues to itself, valid `CA_DAYS` (a little earlier
    than now, for clock skew); callers add extensions and sign."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
    )


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _new_key() -> rsa.RSAPrivateKey:
    # RSA rather than EC: every consumer here (Keycloak's JVM, Redis, nginx, OpenBao, LocalStack,
    # Keycloak's SAML signer) takes an RSA PKCS#8 key without extra configuration.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SystemExit(f"{path}: expected an RSA key")
    return key


# ---------------------------------------------------------------------------------- PKI


def ensure_ca(ca_dir: Path, public_dir: Path) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key_path, cert_path = ca_dir / "ca.key", ca_dir / "ca.crt"
    if key_path.is_file() and cert_path.is_file():
        key = _load_key(key_path)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    else:
        key = _new_key()
        cert = (
            _self_signed(key, CA_NAME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        _write(key_path, _key_pem(key), mode=0o400, owner=None)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o444, owner=None)
    _write(
        public_dir / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), mode=0o444, owner=None
    )
    return key, cert


def _wanted_sans(leaf: Leaf) -> set[str]:
    return {*leaf.dns_names, *LOOPBACK_NAMES, *LOOPBACK_IPS}


def _cert_sans(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {*san.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }


def _leaf_is_current(cert_path: Path, key_path: Path, leaf: Leaf, ca: x509.Certificate) -> bool:
    """Keep an existing leaf only if it is still right: same CA, same names, not near expiry."""
    if not (cert_path.is_file() and key_path.is_file()):
        return False
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, x509.InvalidSignature):
        return False
    return _cert_sans(cert) == _wanted_sans(leaf) and (
        cert.not_valid_after_utc - _now() > RENEW_WITHIN
    )


def issue_leaf(
    leaf: Leaf, ca_key: rsa.RSAPrivateKey, ca_cert: x509.Certificate
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = _new_key()
    now = _now()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in (*leaf.dns_names, *LOOPBACK_NAMES)]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LOOPBACK_IPS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, leaf.dns_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def ensure_leaves(
    tls_dir: Path,
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    *,
    chown: bool,
    leaves: Iterable[Leaf] = LEAVES,
) -> list[str]:
    """Issue (or keep) each service's certificate; returns the services (re)issued."""
    issued = []
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    for leaf in leaves:
        owner = OWNERS[leaf.service] if chown else None
        directory = tls_dir / leaf.service
        cert_path, key_path = directory / "tls.crt", directory / "tls.key"
        if not _leaf_is_current(cert_path, key_path, leaf, ca_cert):
            key, cert = issue_leaf(leaf, ca_key, ca_cert)
            _write(key_path, _key_pem(key), mode=0o400, owner=owner)
            _write(
                cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o444, owner=owner
            )
            issued.append(leaf.service)
        _write(directory / "ca.crt", ca_pem, mode=0o444, owner=owner)
        if leaf.service == "localstack":
            # LocalStack wants key and certificate in one PEM (CUSTOM_SSL_CERT_PATH).
            combined = key_path.read_bytes() + cert_path.read_bytes()
            _write(directory / "server.pem", combined, mode=0o400, owner=owner)
        _own_tree(directory, owner)
    return issued


# ---------------------------------------------------------------------------------- Keycloak


def ensure_realm_signing_key(ca_dir: Path, public_dir: Path) -> tuple[str, str]:
    """The realm's signing key pair: (base64 PKCS#8 DER key, base64 DER certificate).

    Generated here rather than by Keycloak so that the broker can pin the certificate
    (idp_certificate_ref) from a file that exists before either of them starts: nothing is
    fetched from the IdP and trusted on first use.
    """
    key_path, cert_path = ca_dir / "keycloak-saml-signing.key", ca_dir / SAML_SIGNING_CERT
    if key_path.is_file() and cert_path.is_file():
        key = _load_key(key_path)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    else:
        key = _new_key()
        cert = _self_signed(key, "agents").sign(key, hashes.SHA256())
        _write(key_path, _key_pem(key), mode=0o400, owner=None)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o444, owner=None)
    _write(
        public_dir / SAML_SIGNING_CERT,
        cert.public_bytes(serialization.Encoding.PEM),
        mode=0o444,
        owner=None,
    )
    der_key = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return (
        base64.b64encode(der_key).decode(),
        base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode(),
    )


def render_realm(people: dict, signing_key: str, signing_cert: str) -> dict:
    """The realm as Keycloak imports it: people, groups, the OIDC and the SAML client, and the
    signing key generated here as its highest-priority RSA key (it signs the OIDC tokens, whose
    keys the broker reads from the realm's JWKS, and the SAML assertions, whose certificate the
    broker pins). One realm, one set of people: the broker routes JWTs by ``iss`` and SAML
    assertions by ``Issuer`` apart, so the realm's one name serves both protocols.
    """
    realm = copy.deepcopy(people)
    providers = [
        {
            "name": "demo-realm-signing",
            "providerId": "rsa",
            "subComponents": {},
            "config": {
                "privateKey": [signing_key],
                "certificate": [signing_cert],
                "priority": ["200"],
                "algorithm": ["RS256"],
                "active": ["true"],
                "enabled": ["true"],
            },
        },
        {"name": "hmac-generated", "providerId": "hmac-generated", "subComponents": {},
         "config": {"priority": ["100"], "algorithm": ["HS512"]}},
        {"name": "aes-generated", "providerId": "aes-generated", "subComponents": {},
         "config": {"priority": ["100"]}},
    ]
    realm.setdefault("components", {})["org.keycloak.keys.KeyProvider"] = providers
    return realm


def ensure_realms(
    realms_dir: Path, import_dir: Path, ca_dir: Path, public_dir: Path, *, chown: bool
) -> None:
    people = json.loads((realms_dir / PEOPLE_REALM).read_text(encoding="utf-8"))
    key, cert = ensure_realm_signing_key(ca_dir, public_dir)
    owner = OWNERS["keycloak"] if chown else None
    data = json.dumps(render_realm(people, key, cert), indent=2).encode()
    _write(import_dir / PEOPLE_REALM, data, mode=0o400, owner=owner)
    _own_tree(import_dir, owner)


# ---------------------------------------------------------------------------------- secrets


def _keep_or_generate(
    path: Path, owner: tuple[int, int] | None, make: str | None = None
) -> str:
    if path.is_file() and path.read_text(encoding="utf-8").strip():
        value = path.read_text(encoding="utf-8").strip()
    else:
        value = make or secrets.token_urlsafe(32)
    _write(path, value.encode() + b"\n", mode=0o400, owner=owner)
    return value


def policy_env_references(policy_dir: Path) -> list[str]:
    """Every `env:NAME` a client of the policy authenticates with (agents, gateways, admins,
    resource servers): the variables the broker replicas must have."""
    from broker.policy import load_policy

    policy = load_policy(policy_dir).policy
    clients = [
        *(agent.spec.authentication for agent in policy.agents.values()),
        *(server.authentication for server in policy.resource_servers.values()),
        *(gateway.authentication for gateway in policy.gateways.values()),
        *(admin.authentication for admin in policy.admins.values()),
    ]
    names = set()
    for auth in clients:
        ref = getattr(auth, "secret_ref", None)
        if ref and ref.startswith("env:"):
            names.add(ref.removeprefix("env:"))
    return sorted(names)


def ensure_secrets(secrets_dir: Path, policy_dir: Path, *, chown: bool) -> None:
    broker = OWNERS["broker"] if chown else None
    redis = OWNERS["redis"] if chown else None
    openbao = OWNERS["openbao"] if chown else None

    for name in policy_env_references(policy_dir):
        _keep_or_generate(secrets_dir / "broker" / "env" / name, broker)

    password = _keep_or_generate(secrets_dir / "broker" / "redis-password", broker)
    _write(secrets_dir / "redis" / "password", password.encode() + b"\n", mode=0o400, owner=redis)
    _write(  # included by deploy/redis/redis.conf
        secrets_dir / "redis" / "password.conf",
        f"requirepass {password}\n".encode(),
        mode=0o400,
        owner=redis,
    )

    # LocalStack accepts any access key; the broker still takes its AWS credentials from the
    # standard chain (a shared credentials file), never from its configuration.
    access_key = "LKIA" + secrets.token_hex(8).upper()
    credentials = secrets_dir / "broker" / "aws-credentials"
    if not credentials.is_file():
        body = (
            "[default]\n"
            f"aws_access_key_id = {access_key}\n"
            f"aws_secret_access_key = {secrets.token_urlsafe(30)}\n"
        )
        _write(credentials, body.encode(), mode=0o400, owner=broker)

    _keep_or_generate(secrets_dir / "openbao" / "root-token", openbao, "s." + secrets.token_hex(16))

    _own_tree(secrets_dir / "broker", broker)
    _own_tree(secrets_dir / "redis", redis)
    _own_tree(secrets_dir / "openbao", openbao)


# ---------------------------------------------------------------------------------- broker


def ensure_signing_key(keys_dir: Path, broker_config: Path | None, *, chown: bool) -> bool:
    """Create the first signing key if the shared directory has none; True if one was made.

    The replicas run with generate_if_missing: false; later keys come from
    `broker keys rotate` (see deploy/README.md), which every replica picks up within a second.
    """
    from broker.clock import SystemClock
    from broker.settings import load_settings
    from broker.tokens import Keyring

    existing = list(keys_dir.glob("*.key.json")) if keys_dir.is_dir() else []
    settings = load_settings(broker_config)
    if not existing:
        keys_dir.mkdir(parents=True, exist_ok=True)
        Keyring(
            keys_dir,
            algorithm=settings.signing_keys.algorithm,
            clock=SystemClock(),
            publish_grace_seconds=settings.tokens.max_lifetime_seconds
            + settings.tokens.leeway_seconds,
            generate_if_missing=True,
        )
    _own_tree(keys_dir, OWNERS["broker"] if chown else None, mode=0o700)
    return not existing


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Root of the volume mounts.")
    parser.add_argument("--policy-dir", type=Path, default=DEPLOY_DIR.parent / "policies")
    parser.add_argument("--realms-dir", type=Path, default=DEPLOY_DIR / "keycloak")
    parser.add_argument("--broker-config", type=Path, default=DEPLOY_DIR / "broker.yaml")
    parser.add_argument(
        "--only",
        choices=["pki", "realms", "secrets", "keys"],
        action="append",
        help="Run only these steps (default: all).",
    )
    parser.add_argument(
        "--chown", action="store_true", help="Give each directory to its service's uid (root)."
    )
    args = parser.parse_args(argv)
    if args.chown and os.geteuid() != 0:
        parser.error("--chown needs root")
    steps = set(args.only or ["pki", "realms", "secrets", "keys"])
    out: Path = args.out
    os.umask(0o077)

    ca_dir, public_dir = out / "ca", out / "public"
    if "pki" in steps:
        ca_key, ca_cert = ensure_ca(ca_dir, public_dir)
        issued = ensure_leaves(out / "tls", ca_key, ca_cert, chown=args.chown)
        print(f"pki: CA ready; issued: {', '.join(issued) or 'none (all current)'}")
    if "realms" in steps:
        import_dir = out / "keycloak-import"
        ensure_realms(args.realms_dir, import_dir, ca_dir, public_dir, chown=args.chown)
        print("realms: rendered for import")
    if "secrets" in steps:
        ensure_secrets(out / "secrets", args.policy_dir, chown=args.chown)
        print("secrets: ready (values not shown)")
    if "keys" in steps:
        made = ensure_signing_key(out / "keys", args.broker_config, chown=args.chown)
        print(f"keys: {'first signing key created' if made else 'kept the existing keys'}")
        audit = out / "audit"
        _own_tree(audit, OWNERS["broker"] if args.chown else None)
    _own_tree(public_dir, None, mode=0o755)
    for path in public_dir.iterdir():
        path.chmod(0o444)
    return 0


if __name__ == "__main__":
    sys.exit(main())
