"""Client secret hashing: formats, verification, refusal of weak inputs, capped scrypt cost."""

from __future__ import annotations

import base64
import hashlib
import time

import pytest

from broker.client_secrets import (
    MIN_SHA256_SECRET_LENGTH,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    generate_client_secret,
    hash_client_secret,
    verify_client_secret,
)
from broker.policy.model import ClientSecretBasicAuth


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_generated_secrets_are_long_random_and_url_safe() -> None:
    secrets = {generate_client_secret() for _ in range(20)}
    assert len(secrets) == 20
    for secret in secrets:
        assert len(secret) >= 43
        assert set(secret) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )


def test_scrypt_format_and_round_trip() -> None:
    stored = hash_client_secret("correct horse battery staple")
    method, n, r, p, salt, digest = stored.split("$")
    assert (method, int(n), int(r), int(p)) == ("scrypt", SCRYPT_N, SCRYPT_R, SCRYPT_P)
    assert (SCRYPT_N, SCRYPT_R, SCRYPT_P) == (2**14, 8, 1)
    assert len(_unb64(salt)) >= 16
    assert "=" not in salt + digest
    expected = hashlib.scrypt(
        b"correct horse battery staple", salt=_unb64(salt), n=2**14, r=8, p=1, dklen=32
    )
    assert _unb64(digest) == expected
    assert verify_client_secret("correct horse battery staple", stored)
    assert not verify_client_secret("correct horse battery stapler", stored)
    assert not verify_client_secret("", stored)


def test_sha256_format_and_round_trip() -> None:
    secret = generate_client_secret()
    stored = hash_client_secret(secret, method="sha256")
    method, salt, digest = stored.split("$")
    assert method == "sha256"
    assert _unb64(digest) == hashlib.sha256(_unb64(salt) + secret.encode()).digest()
    assert verify_client_secret(secret, stored)
    assert not verify_client_secret(secret[:-1], stored)
    assert not verify_client_secret(secret + "x", stored)


def test_each_hash_has_its_own_salt() -> None:
    secret = generate_client_secret()
    for method in ("scrypt", "sha256"):
        first = hash_client_secret(secret, method=method)  # type: ignore[arg-type]
        second = hash_client_secret(secret, method=method)  # type: ignore[arg-type]
        assert first != second
        assert verify_client_secret(secret, first) and verify_client_secret(secret, second)


def test_sha256_refuses_short_secrets() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        hash_client_secret("x" * (MIN_SHA256_SECRET_LENGTH - 1), method="sha256")
    assert hash_client_secret("x" * MIN_SHA256_SECRET_LENGTH, method="sha256").startswith("sha256$")


def test_refuses_empty_secret_and_unknown_method() -> None:
    with pytest.raises(ValueError):
        hash_client_secret("")
    with pytest.raises(ValueError, match="unknown hash method"):
        hash_client_secret("a" * 40, method="md5")  # type: ignore[arg-type]


def test_hashes_are_accepted_by_the_policy_model() -> None:
    for method in ("scrypt", "sha256"):
        stored = hash_client_secret(generate_client_secret(), method=method)  # type: ignore[arg-type]
        auth = ClientSecretBasicAuth(method="client_secret_basic", secret_hash=stored)
        assert auth.secret_hash == stored


def test_non_ascii_secret_round_trips() -> None:
    stored = hash_client_secret("pässwörd-ünïcode")
    assert verify_client_secret("pässwörd-ünïcode", stored)
    assert not verify_client_secret("passwörd-ünïcode", stored)


_SALT = _b64(b"\x01" * 16)
_DIGEST = _b64(b"\x02" * 32)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plain-secret",
        "sha256$",
        "sha256$$",
        f"sha256${_SALT}",
        f"sha256${_SALT}${_DIGEST}$extra",
        f"sha256$!!!${_DIGEST}",
        f"sha256${_SALT}$not*base64",
        f"sha256${_SALT}${_b64(b'short')}",
        f"sha256$${_DIGEST}",
        f"md5${_SALT}${_DIGEST}",
        f"SHA256${_SALT}${_DIGEST}",
        f"scrypt$16384$8$1${_SALT}",
        f"scrypt$16384$8${_SALT}${_DIGEST}",
        f"scrypt$abc$8$1${_SALT}${_DIGEST}",
        f"scrypt$-16384$8$1${_SALT}${_DIGEST}",
        f"scrypt$16385$8$1${_SALT}${_DIGEST}",  # n not a power of two
        f"scrypt$0$8$1${_SALT}${_DIGEST}",
        f"scrypt$1$8$1${_SALT}${_DIGEST}",
        f"scrypt$16384$0$1${_SALT}${_DIGEST}",
        f"scrypt$16384$8$0${_SALT}${_DIGEST}",
        f"scrypt$16384$8$1$${_DIGEST}",
        f"scrypt$16384$8$1${_SALT}$",
        f"scrypt$16384$8$1${_SALT}${_b64(b'x')}",
        f"scrypt$16384$8$1${_SALT}${_b64(b'x' * 200)}",
        f"scrypt$\uff11\uff16\uff13\uff18\uff14$8$1${_SALT}${_DIGEST}",  # fullwidth digits
        f"scrypt$99999999999999999999$8$1${_SALT}${_DIGEST}",
        "scrypt$16384$8$1$\x00$\x00",
    ],
)
def test_malformed_stored_values_never_verify_nor_raise(stored: str) -> None:
    assert verify_client_secret("some secret that is long enough to be hashed", stored) is False


@pytest.mark.parametrize(
    ("n", "r", "p"),
    [
        (2**18, 8, 1),  # n over 2**17
        (2**30, 8, 1),
        (2**17, 16, 4),  # each within its cap, but n * r * p far over the work cap
        (2**17, 16, 1),
    ],
)
def test_costly_scrypt_parameters_are_refused_without_work(n: int, r: int, p: int) -> None:
    stored = f"scrypt${n}${r}${p}${_SALT}${_DIGEST}"
    started = time.perf_counter()
    assert not verify_client_secret("over-the-cap", stored)
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize(("n", "r", "p"), [(2**10, 17, 1), (2**10, 8, 5)])
def test_scrypt_parameters_over_the_caps_do_not_verify_even_with_the_right_digest(
    n: int, r: int, p: int
) -> None:
    secret, salt = "over-the-cap", b"\x05" * 16
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    assert not verify_client_secret(secret, f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}")


def test_scrypt_parameters_within_the_caps_are_honoured() -> None:
    secret = "within-the-cap"
    salt = b"\x07" * 16
    for n, r, p in [(2**10, 8, 1), (2**12, 16, 2), (2**10, 4, 4)]:
        digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
        stored = f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"
        assert verify_client_secret(secret, stored)
        assert not verify_client_secret(secret + "!", stored)


def test_verify_rejects_non_string_inputs_without_raising() -> None:
    stored = hash_client_secret("abc")
    assert verify_client_secret(None, stored) is False  # type: ignore[arg-type]
    assert verify_client_secret("abc", None) is False  # type: ignore[arg-type]
    assert verify_client_secret(b"abc", stored) is False  # type: ignore[arg-type]
