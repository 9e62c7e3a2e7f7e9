"""`broker serve` with `http.tls_cert_file` / `http.tls_key_file`: HTTPS only, verified against a
CA made here; an exchange over it; a plain-HTTP client gets no answer; a broken key pair stops
the broker at start with an error naming the files, not their content."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.harness import (
    BROKER_COMMAND,
    EXAMPLE_POLICIES,
    broker_process,
    example_client_secrets,
    exchange_form,
    oidc_provider_config,
    placeholder_vault,
    serve_idp,
    wait_until_serving,
)
from tests.support.servers import free_loopback_port

SECRETS = example_client_secrets()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost: (ca, cert, key) paths."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test CA"))
        .issuer_name(_name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (directory / n for n in ("ca.crt", "tls.crt", "tls.key"))
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def _config(tmp_path: Path, port: int, cert: Path, key: Path, idp: dict[str, object]) -> Path:
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": f"https://127.0.0.1:{port}",
                "policy_dir": str(EXAMPLE_POLICIES),
                **placeholder_vault(tmp_path),
                "signing_keys": {"directory": str(tmp_path / "keys")},
                "identity_providers": [idp],
                "http": {"port": port, "tls_cert_file": str(cert), "tls_key_file": str(key)},
                "audit": {"stdout": False},
            }
        )
    )
    return config


def _serve(config: Path, log: Path) -> AbstractContextManager[subprocess.Popen[bytes]]:
    return broker_process(["serve", "--config", str(config)], log, os.environ | SECRETS)


def test_serves_https_only_and_exchanges_over_it(tmp_path: Path) -> None:
    ca, cert, key = _make_pki(tmp_path)
    port = free_loopback_port()
    url = f"https://127.0.0.1:{port}"
    with serve_idp() as (idp, _):
        config = _config(tmp_path, port, cert, key, oidc_provider_config(idp))
        log = tmp_path / "broker.log"
        with _serve(config, log) as process:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("SSL_CERT_FILE", str(ca))  # wait_until_serving's client trusts it
                wait_until_serving(url, process, log)
            with httpx.Client(verify=str(ca), timeout=10) as client:
                assert client.get(f"{url}/healthz").status_code == 200
                exchanged = client.post(
                    f"{url}/oauth2/token",
                    data=exchange_form(idp.mint("alice"), scope="tickets:read"),
                    auth=("triage-agent", SECRETS["TRIAGE_AGENT_SECRET"]),
                )
                assert exchanged.status_code == 200, exchanged.text
                metadata = client.get(f"{url}/.well-known/oauth-authorization-server").json()
                assert metadata["token_endpoint"] == f"{url}/oauth2/token"
            # `broker healthcheck` (the container healthcheck) finds HTTPS and the port in the
            # same configuration and pins the broker's own certificate: no CA bundle needed.
            for extra in ([], ["--ready"]):
                probe = _healthcheck(config, *extra)
                assert probe.returncode == 0, probe.stderr
                assert probe.stdout.startswith(f"ok: https://127.0.0.1:{port}/")
            # The system CAs do not know ours; and nothing is served in clear text.
            with httpx.Client(timeout=5) as untrusting, pytest.raises(httpx.ConnectError):
                untrusting.get(f"{url}/healthz")
            with httpx.Client(timeout=5) as plain, pytest.raises(httpx.TransportError):
                plain.get(f"http://127.0.0.1:{port}/healthz")


def _healthcheck(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BROKER_COMMAND, "healthcheck", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_healthcheck_fails_when_nothing_answers_or_another_certificate_does(
    tmp_path: Path,
) -> None:
    _, cert, key = _make_pki(tmp_path)
    port = free_loopback_port()
    with serve_idp() as (idp, _):
        config = _config(tmp_path, port, cert, key, oidc_provider_config(idp))
        down = _healthcheck(config)
        assert down.returncode == 1 and down.stderr.startswith("unhealthy: ")
        log = tmp_path / "broker.log"
        with _serve(config, log) as process:
            ca = tmp_path / "ca.crt"
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("SSL_CERT_FILE", str(ca))
                wait_until_serving(f"https://127.0.0.1:{port}", process, log)
            assert _healthcheck(config).returncode == 0
            # A configuration naming a different certificate: the pin does not match.
            other = tmp_path / "other"
            other.mkdir()
            _, other_cert, other_key = _make_pki(other)
            impostor = other / "broker.yaml"
            impostor.write_text(
                config.read_text()
                .replace(str(cert), str(other_cert))
                .replace(str(key), str(other_key))
            )
            refused = _healthcheck(impostor)
            assert refused.returncode == 1 and "ConnectError" in refused.stderr


def test_a_broken_key_pair_stops_the_broker_at_start(tmp_path: Path) -> None:
    _, cert, _ = _make_pki(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, _, other_key = _make_pki(other)  # a key that does not match the certificate
    port = free_loopback_port()
    with serve_idp() as (idp, _):
        config = _config(tmp_path, port, cert, other_key, oidc_provider_config(idp))
        result = subprocess.run(
            [BROKER_COMMAND, "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            env=os.environ | SECRETS,
            timeout=60,
        )
    assert result.returncode == 1
    assert "http.tls_cert_file/tls_key_file" in result.stderr
    assert "PRIVATE KEY" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
