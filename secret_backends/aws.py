"""AWS Secrets Manager backend (boto3).

`SecretRef` conventions
-----------------------
- ``path`` is the secret's name or full ARN (anything ``SecretId`` accepts).
- ``stage`` selects a staging label (``AWSCURRENT``, ``AWSPREVIOUS``, ``AWSPENDING`` or a custom
  one); None means ``AWSCURRENT``. ``version`` pins a ``VersionId`` (with ``stage``, both must
  match, as in ``GetSecretValue``).
- ``SecretString`` holding a JSON object gives one field per key (non-string values become their
  compact JSON, ``null`` values are left out); any other string is the single field ``value``.
  ``SecretBinary`` is the single field ``value``, base64-encoded (standard alphabet, padded).
- ``version_id`` is the ``VersionId``, ``stage`` the selected (or, when pinned by version only,
  the version's principal) label, ``created_at`` the version's ``CreatedDate``.
- `current_version` calls ``DescribeSecret`` (metadata only) and finds the version that holds
  the stage in ``VersionIdsToStages``; a cache calls ``GetSecretValue`` (`read`) only when that
  changes. During a rotation the new version is ``AWSPENDING`` until the rotation's last step
  moves ``AWSCURRENT`` to it (the previous version becomes ``AWSPREVIOUS``), so
  `current_version` of an ``AWSCURRENT`` reference changes exactly when the rotation finishes.

Credentials come from the standard chain (environment, ``profile``, web identity, container or
instance role); the configuration holds none. The client uses botocore's ``standard`` retry mode
with `max_attempts`, and explicit connect/read timeouts.

Errors and logging
------------------
botocore errors are translated here (see `translate_error`); messages name the backend and the
secret id, never a value (AWS's own message goes to ``debug``). botocore logs whole response
bodies at DEBUG, so at construction the ``botocore``, ``boto3`` and ``urllib3`` loggers are
raised to WARNING (`quiet_sdk_loggers`); do not lower them again.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from broker.types import Sensitive
from secret_backends.base import (
    BackendThrottled,
    BackendUnavailable,
    Secret,
    SecretAccessDenied,
    SecretBackendError,
    SecretNotFound,
    SecretRef,
    quiet_sdk_loggers,
)
from secret_backends.config import AwsSecretsManagerConfig

CURRENT_STAGE = "AWSCURRENT"
SDK_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer")

_T = TypeVar("_T")
_NOT_FOUND = frozenset(
    {"ResourceNotFoundException", "InvalidRequestException", "InvalidParameterException"}
)
_DENIED = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "DecryptionFailure",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "MissingAuthenticationToken",
        "KMSAccessDeniedException",
        "KMSDisabledException",
        "KMSInvalidStateException",
    }
)
_THROTTLED = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "LimitExceededException",
    }
)
_UNAVAILABLE = frozenset(
    {"InternalServiceError", "InternalFailure", "ServiceUnavailable", "RequestTimeout"}
)


def translate_error(exc: Exception, what: str) -> SecretBackendError:
    """Map a botocore exception to a backend error whose message is `what` + a reason."""
    if isinstance(exc, SecretBackendError):
        return exc
    debug = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _NOT_FOUND:
            return SecretNotFound(f"{what}: not found or not readable ({code})", debug=debug)
        if code in _DENIED:
            return SecretAccessDenied(f"{what}: access denied ({code})", debug=debug)
        if code in _THROTTLED or status == 429:
            return BackendThrottled(f"{what}: throttled by AWS ({code})", debug=debug)
        if code in _UNAVAILABLE or status >= 500:
            return BackendUnavailable(f"{what}: AWS is unavailable ({code})", debug=debug)
        if status in {401, 403}:
            return SecretAccessDenied(f"{what}: access denied ({code})", debug=debug)
        if status == 404:
            return SecretNotFound(f"{what}: not found ({code})", debug=debug)
        return BackendUnavailable(f"{what}: unexpected AWS error ({code})", debug=debug)
    if isinstance(
        exc,
        botocore.exceptions.NoCredentialsError
        | botocore.exceptions.PartialCredentialsError
        | botocore.exceptions.CredentialRetrievalError,
    ):
        return SecretAccessDenied(f"{what}: no usable AWS credentials", debug=debug)
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        return SecretNotFound(f"{what}: invalid secret reference", debug=debug)
    if isinstance(exc, botocore.exceptions.ConnectionError | botocore.exceptions.HTTPClientError):
        return BackendUnavailable(f"{what}: cannot reach AWS Secrets Manager", debug=debug)
    return BackendUnavailable(f"{what}: unexpected AWS error", debug=debug)


def _fields(response: Mapping[str, Any]) -> dict[str, Sensitive]:
    if "SecretString" in response:
        text = response["SecretString"]
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return {
                str(key): Sensitive(
                    value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
                )
                for key, value in parsed.items()
                if value is not None
            }
        return {"value": Sensitive(text)}
    if "SecretBinary" in response:
        return {"value": Sensitive(base64.b64encode(response["SecretBinary"]).decode("ascii"))}
    raise SecretNotFound("the secret version has neither SecretString nor SecretBinary")


def _timestamp(value: object) -> float | None:
    return value.timestamp() if isinstance(value, datetime) else None


class AwsSecretsManagerBackend:
    """A `SecretBackend` over AWS Secrets Manager (see the module docstring)."""

    def __init__(
        self,
        config: AwsSecretsManagerConfig,
        *,
        session: boto3.session.Session | None = None,
    ) -> None:
        """`session` (tests, custom credential providers) defaults to a new boto3 session using
        the standard credential chain with the configured profile and region."""
        quiet_sdk_loggers(SDK_LOGGERS)
        self._config = config
        try:
            if session is None:
                session = boto3.session.Session(
                    profile_name=config.profile, region_name=config.region
                )
            self._client = session.client(
                "secretsmanager",
                region_name=config.region,
                endpoint_url=config.endpoint_url,
                config=botocore.config.Config(
                    connect_timeout=config.connect_timeout_seconds,
                    read_timeout=config.read_timeout_seconds,
                    retries={"mode": "standard", "max_attempts": config.max_attempts},
                ),
            )
        except botocore.exceptions.NoRegionError:
            raise ValueError(
                f"aws backend {config.name!r}: no region (set `region` or AWS_REGION)"
            ) from None
        except botocore.exceptions.ProfileNotFound:
            raise ValueError(
                f"aws backend {config.name!r}: profile {config.profile!r} not found"
            ) from None

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def client(self) -> Any:
        """The boto3 ``secretsmanager`` client, for instrumentation (event hooks, metrics)."""
        return self._client

    def read(self, ref: SecretRef) -> Secret:
        """``GetSecretValue`` for the referenced stage or version. Raises a `SecretBackendError`."""
        what = self._what("read", ref)
        params: dict[str, str] = {"SecretId": self._secret_id(ref)}
        if ref.version is not None:
            params["VersionId"] = ref.version
        if ref.stage is not None or ref.version is None:
            params["VersionStage"] = ref.stage or CURRENT_STAGE
        response = self._call(what, lambda: self._client.get_secret_value(**params))
        try:
            stages = list(response.get("VersionStages") or [])
            if ref.stage is not None or ref.version is None:
                stage: str | None = ref.stage or CURRENT_STAGE
            elif CURRENT_STAGE in stages:
                stage = CURRENT_STAGE
            else:
                stage = stages[0] if stages else None
            secret = Secret(
                ref=ref,
                version_id=str(response["VersionId"]),
                fields=_fields(response),
                stage=stage,
                created_at=_timestamp(response.get("CreatedDate")),
            )
        except SecretNotFound as exc:
            raise SecretNotFound(f"{what}: {exc.message}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendUnavailable(
                f"{what}: unexpected response", debug=type(exc).__name__
            ) from None
        if ref.field is not None and ref.field not in secret.fields:
            raise SecretNotFound(f"{what}: the secret has no field {ref.field!r}")
        return secret

    def current_version(self, ref: SecretRef) -> str | None:
        """The ``VersionId`` holding the stage, from ``DescribeSecret`` (no value is fetched);
        a pinned version as given."""
        if ref.version is not None:
            return ref.version
        what = self._what("describe", ref)
        secret_id = self._secret_id(ref)
        response = self._call(what, lambda: self._client.describe_secret(SecretId=secret_id))
        if response.get("DeletedDate") is not None:
            raise SecretNotFound(f"{what}: the secret is scheduled for deletion")
        stage = ref.stage or CURRENT_STAGE
        for version_id, stages in (response.get("VersionIdsToStages") or {}).items():
            if stage in stages:
                return str(version_id)
        raise SecretNotFound(f"{what}: no version holds the stage {stage!r}")

    def close(self) -> None:
        self._client.close()

    def _secret_id(self, ref: SecretRef) -> str:
        if not ref.path or ref.path.strip() != ref.path:
            raise SecretNotFound(f"aws backend {self.name!r}: invalid secret id {ref.path!r}")
        return ref.path

    def _what(self, action: str, ref: SecretRef) -> str:
        return f"aws backend {self.name!r}: {action} {ref.path!r}"

    @staticmethod
    def _call(what: str, operation: Callable[[], _T]) -> _T:
        try:
            return operation()
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise translate_error(exc, what) from None
