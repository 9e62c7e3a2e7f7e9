"""AwsSecretsManagerBackend against a real moto server (no in-process mocks).

Credentials reach the backend through the standard chain (environment variables); API calls
are counted with botocore event hooks on the backend's own client.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import botocore.exceptions
import pytest

from secret_backends import (
    BackendThrottled,
    BackendUnavailable,
    SecretAccessDenied,
    SecretBackend,
    SecretNotFound,
    SecretRef,
)
from secret_backends.aws import AwsSecretsManagerBackend, translate_error
from secret_backends.config import AwsSecretsManagerConfig
from tests.support.servers import MotoServer, run_moto


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with run_moto() as server:
        yield server


@pytest.fixture(autouse=True)
def aws_env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in moto.credentials_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


def config_for(server: MotoServer, **overrides: Any) -> AwsSecretsManagerConfig:
    values: dict[str, Any] = {
        "name": "aws",
        "kind": "aws_secrets_manager",
        "endpoint_url": server.endpoint_url,
        "region": server.region,
        "connect_timeout_seconds": 1.0,
        "read_timeout_seconds": 2.0,
        "max_attempts": 1,
    }
    values.update(overrides)
    return AwsSecretsManagerConfig(**values)


class CallCounter:
    """Counts API calls made by one client, via botocore's before-call events."""

    def __init__(self, client: Any) -> None:
        self.calls: Counter[str] = Counter()
        for operation in ("GetSecretValue", "DescribeSecret"):
            client.meta.events.register(
                f"before-call.secrets-manager.{operation}", self._hook(operation)
            )

    def _hook(self, operation: str) -> Any:
        def hook(**_: Any) -> None:
            self.calls[operation] += 1

        return hook


@pytest.fixture
def backend(moto: MotoServer) -> Iterator[AwsSecretsManagerBackend]:
    instance = AwsSecretsManagerBackend(config_for(moto))
    yield instance
    instance.close()


def unique() -> str:
    return "app/" + uuid.uuid4().hex[:12]


def test_read_by_name_and_arn_with_json_fields(
    moto: MotoServer, backend: AwsSecretsManagerBackend
) -> None:
    name = unique()
    value = {"username": "svc", "password": "canary-aws-1", "port": 5432, "none": None}
    created = moto.client().create_secret(Name=name, SecretString=json.dumps(value))
    assert isinstance(backend, SecretBackend)

    secret = backend.read(SecretRef("aws", name, field="password"))
    assert secret.value.reveal() == "canary-aws-1"
    assert {k: v.reveal() for k, v in secret.fields.items()} == {
        "username": "svc",
        "password": "canary-aws-1",
        "port": "5432",
    }
    assert secret.version_id == created["VersionId"]
    assert secret.stage == "AWSCURRENT"
    assert secret.created_at is not None and abs(secret.created_at - time.time()) < 60
    assert secret.expires_at is None
    assert "canary" not in repr(secret)

    by_arn = backend.read(SecretRef("aws", created["ARN"], field="username"))
    assert by_arn.value.reveal() == "svc"
    assert by_arn.version_id == created["VersionId"]
    assert backend.current_version(SecretRef("aws", created["ARN"])) == created["VersionId"]

    with pytest.raises(SecretNotFound, match="no field 'token'"):
        backend.read(SecretRef("aws", name, field="token"))


def test_plain_string_and_binary_secrets(
    moto: MotoServer, backend: AwsSecretsManagerBackend
) -> None:
    plain, binary, json_scalar = unique(), unique(), unique()
    client = moto.client()
    client.create_secret(Name=plain, SecretString="sk-plain-value")
    client.create_secret(Name=binary, SecretBinary=b"\x00\xffbinary")
    client.create_secret(Name=json_scalar, SecretString='"a json string"')

    assert backend.read(SecretRef("aws", plain)).value.reveal() == "sk-plain-value"
    encoded = backend.read(SecretRef("aws", binary)).value.reveal()
    assert base64.b64decode(encoded) == b"\x00\xffbinary"
    assert backend.read(SecretRef("aws", json_scalar)).value.reveal() == '"a json string"'


def test_rotation_moves_current_version_only_when_the_stage_moves(
    moto: MotoServer, backend: AwsSecretsManagerBackend
) -> None:
    name = unique()
    client = moto.client()
    first = client.create_secret(Name=name, SecretString=json.dumps({"key": "old"}))["VersionId"]
    counter = CallCounter(backend.client)
    current = SecretRef("aws", name, field="key")
    pending = SecretRef("aws", name, field="key", stage="AWSPENDING")
    previous = SecretRef("aws", name, field="key", stage="AWSPREVIOUS")

    # A cache: describe (cheap), read only when the version changed.
    assert backend.current_version(current) == first
    assert backend.read(current).value.reveal() == "old"
    assert counter.calls["GetSecretValue"] == 1

    # createSecret: the new version, labelled AWSPENDING only.
    second = str(uuid.uuid4())
    client.put_secret_value(
        SecretId=name,
        ClientRequestToken=second,
        SecretString=json.dumps({"key": "new"}),
        VersionStages=["AWSPENDING"],
    )
    for _ in range(3):
        assert backend.current_version(current) == first
    assert counter.calls["GetSecretValue"] == 1
    assert backend.current_version(pending) == second
    staged = backend.read(pending)
    assert (staged.value.reveal(), staged.version_id, staged.stage) == ("new", second, "AWSPENDING")

    # setSecret / testSecret happen in the target system; finishSecret moves AWSCURRENT.
    client.update_secret_version_stage(
        SecretId=name, VersionStage="AWSCURRENT", MoveToVersionId=second, RemoveFromVersionId=first
    )
    assert backend.current_version(current) == second
    rotated = backend.read(current)
    assert (rotated.value.reveal(), rotated.version_id, rotated.stage) == (
        "new",
        second,
        "AWSCURRENT",
    )
    assert backend.current_version(previous) == first
    old = backend.read(previous)
    assert (old.value.reveal(), old.version_id, old.stage) == ("old", first, "AWSPREVIOUS")

    by_version = backend.read(SecretRef("aws", name, field="key", version=first))
    assert (by_version.value.reveal(), by_version.stage) == ("old", "AWSPREVIOUS")
    assert backend.current_version(SecretRef("aws", name, version=first)) == first

    calls_before = counter.calls["GetSecretValue"]
    for _ in range(3):
        assert backend.current_version(current) == second
    assert counter.calls["GetSecretValue"] == calls_before
    assert counter.calls["DescribeSecret"] == 10  # a pinned version needs no call


def test_not_found_cases(moto: MotoServer, backend: AwsSecretsManagerBackend) -> None:
    missing = SecretRef("aws", unique())
    with pytest.raises(SecretNotFound, match="ResourceNotFoundException"):
        backend.read(missing)
    with pytest.raises(SecretNotFound):
        backend.current_version(missing)

    name = unique()
    moto.client().create_secret(Name=name, SecretString="x")
    with pytest.raises(SecretNotFound, match="AWSPENDING"):
        backend.current_version(SecretRef("aws", name, stage="AWSPENDING"))
    with pytest.raises(SecretNotFound):
        backend.read(SecretRef("aws", name, stage="AWSPENDING"))
    with pytest.raises(SecretNotFound):
        backend.read(SecretRef("aws", name, version=str(uuid.uuid4())))
    with pytest.raises(SecretNotFound):
        backend.read(SecretRef("aws", ""))

    moto.client().delete_secret(SecretId=name, RecoveryWindowInDays=7)
    with pytest.raises(SecretNotFound, match="deletion"):
        backend.current_version(SecretRef("aws", name))
    with pytest.raises(SecretNotFound):
        backend.read(SecretRef("aws", name))


def test_no_credentials_is_denied(
    moto: MotoServer, backend: AwsSecretsManagerBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    without = AwsSecretsManagerBackend(config_for(moto))
    try:
        with pytest.raises(SecretAccessDenied, match="no usable AWS credentials"):
            without.read(SecretRef("aws", unique()))
    finally:
        without.close()


def test_outage_is_unavailable_and_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    with run_moto() as server:
        for name, value in server.credentials_env.items():
            monkeypatch.setenv(name, value)
        server.client().create_secret(Name="app/outage", SecretString="before")
        backend = AwsSecretsManagerBackend(config_for(server))
        ref = SecretRef("aws", "app/outage")
        try:
            assert backend.read(ref).value.reveal() == "before"
            server.stop()
            with pytest.raises(BackendUnavailable) as caught:
                backend.read(ref)
            assert caught.value.condition == "unavailable"
            with pytest.raises(BackendUnavailable):
                backend.current_version(ref)

            server.start()  # in-memory: the secret must be created again
            server.client().create_secret(Name="app/outage", SecretString="after")
            assert backend.read(ref).value.reveal() == "after"
        finally:
            backend.close()


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetSecretValue",
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (client_error("ResourceNotFoundException", 400), SecretNotFound),
        (client_error("AccessDeniedException", 400), SecretAccessDenied),
        (client_error("DecryptionFailure", 400), SecretAccessDenied),
        (client_error("UnrecognizedClientException", 400), SecretAccessDenied),
        (client_error("ThrottlingException", 400), BackendThrottled),
        (client_error("TooManyRequestsException", 400), BackendThrottled),
        (client_error("SomethingNew", 429), BackendThrottled),
        (client_error("InternalServiceError", 500), BackendUnavailable),
        (client_error("SomethingNew", 503), BackendUnavailable),
        (botocore.exceptions.EndpointConnectionError(endpoint_url="https://x"), BackendUnavailable),
        (botocore.exceptions.ConnectTimeoutError(endpoint_url="https://x"), BackendUnavailable),
        (botocore.exceptions.ReadTimeoutError(endpoint_url="https://x"), BackendUnavailable),
        (botocore.exceptions.NoCredentialsError(), SecretAccessDenied),
    ],
)
def test_error_translation(error: Exception, expected: type[Exception]) -> None:
    translated = translate_error(error, "aws backend 'aws': read 'x'")
    assert type(translated) is expected
    assert translated.message.startswith("aws backend 'aws': read 'x'")


def test_debug_logging_never_shows_values(
    moto: MotoServer, caplog: pytest.LogCaptureFixture
) -> None:
    canary = "canary-" + uuid.uuid4().hex
    name = unique()
    moto.client().create_secret(Name=name, SecretString=json.dumps({"password": canary}))
    sdk_loggers = [logging.getLogger(n) for n in ("botocore", "boto3", "urllib3")]
    saved = [logger.level for logger in sdk_loggers]
    try:
        # Control: botocore at DEBUG really does log response bodies with the value.
        logging.getLogger("botocore").setLevel(logging.DEBUG)
        caplog.set_level(logging.DEBUG)
        moto.client().get_secret_value(SecretId=name)
        assert any(canary in r.getMessage() for r in caplog.records)
        caplog.clear()

        for logger in sdk_loggers:  # an application that turned DEBUG on before startup
            logger.setLevel(logging.DEBUG)
        backend = AwsSecretsManagerBackend(config_for(moto))
        try:
            assert backend.read(SecretRef("aws", name, field="password")).value.reveal() == canary
            assert backend.current_version(SecretRef("aws", name))
            with pytest.raises(SecretNotFound):
                backend.read(SecretRef("aws", unique()))
        finally:
            backend.close()
        assert all(logger.level == logging.WARNING for logger in sdk_loggers)
    finally:
        for logger, level in zip(sdk_loggers, saved, strict=True):
            logger.setLevel(level)
    for record in caplog.records:
        assert canary not in record.getMessage() + repr(record.args)
