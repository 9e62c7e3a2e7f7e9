"""Hashing of OAuth client secrets for the policy files.

A policy file never holds a client secret, only a salted hash of it (or a reference to where the
secret lives). Two formats are understood:

``scrypt$<n>$<r>$<p>$<salt b64url>$<hash b64url>``
    The default: a memory-hard KDF (``hashlib.scrypt``, n=2**14, r=8, p=1), safe for any secret.

``sha256$<salt b64url>$<hash b64url>``
    A salted SHA-256, fast to check. Only for high-entropy *generated* secrets (at least 32
    characters, such as those from `generate_client_secret`): a fast hash offers no protection
    to a guessable secret, so shorter secrets are refused.

`verify_client_secret` never raises: a malformed stored value simply does not verify. The scrypt
parameters are read from the stored value, so they are capped (n <= 2**17, r <= 16, p <= 4, and
n * r * p <= 2**20, i.e. at most 8x the default work and 128 MiB) to stop a policy file from
making the broker burn CPU or memory on every authentication; a stored value over a cap does not
verify.

`BoundedSecretVerifier` runs the checks on a thread pool of their own (never asyncio's default
pool, which backend calls share) and refuses at once, with `SecretVerifierBusy`, when more checks
are running and waiting than it allows: a flood of wrong secrets cannot queue without bound or
delay the rest of the broker. `dummy_like` makes a stored value of the same kind and cost as a
real one, for the unknown-client path to verify against (equal work whether or not a client
exists).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Protocol

HashMethod = Literal["sha256", "scrypt"]

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAX_N = 2**17
SCRYPT_MAX_R = 16
SCRYPT_MAX_P = 4
SCRYPT_MAX_COST = 2**20
"""Cap on n * r * p: each of the caps alone allows 2**17 * 16 * 4, several seconds per check."""
SALT_BYTES = 16
HASH_BYTES = 32
MIN_SHA256_SECRET_LENGTH = 32
MAX_SECRET_LENGTH = 4096
"""Longer presented secrets are rejected without hashing (no secret we generate comes close)."""
_B64URL_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def generate_client_secret() -> str:
    """A new random client secret (32 random bytes, URL-safe base64: 43 characters)."""
    return secrets.token_urlsafe(32)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Decode unpadded URL-safe base64; raises ValueError for anything else."""
    if not text or any(c not in _B64URL_ALPHABET for c in text):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # maxmem: scrypt needs about 128 * n * r bytes (+ 128 * r * p); leave headroom.
    maxmem = 128 * n * r * 2 + 128 * r * p + 1024 * 1024
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def _sha256(secret: bytes, salt: bytes) -> bytes:
    return hashlib.sha256(salt + secret).digest()


def hash_client_secret(secret: str, *, method: HashMethod = "scrypt") -> str:
    """Hash `secret` with a fresh random salt, in the format `verify_client_secret` reads.

    Raises ValueError for an empty or over-long secret, for an unknown method, and for a
    ``sha256`` hash of a secret shorter than 32 characters.
    """
    if not secret:
        raise ValueError("the secret is empty")
    if len(secret) > MAX_SECRET_LENGTH:
        raise ValueError(f"the secret is longer than {MAX_SECRET_LENGTH} characters")
    salt = secrets.token_bytes(SALT_BYTES)
    raw = secret.encode("utf-8")
    if method == "scrypt":
        digest = _scrypt(raw, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES)
        return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64encode(salt)}${_b64encode(digest)}"
    if method == "sha256":
        if len(secret) < MIN_SHA256_SECRET_LENGTH:
            raise ValueError(
                f"sha256 is only for generated secrets of at least {MIN_SHA256_SECRET_LENGTH} "
                "characters; use scrypt for this secret"
            )
        return f"sha256${_b64encode(salt)}${_b64encode(_sha256(raw, salt))}"
    raise ValueError(f"unknown hash method {method!r}")


def _parse_int(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 7:
        raise ValueError("not a small decimal integer")
    return int(text)


def verify_client_secret(secret: str, stored: str) -> bool:
    """Whether `secret` matches the `stored` hash. Constant-time compare; never raises."""
    try:
        return _verify(secret, stored)
    except Exception:  # a malformed stored value must neither verify nor raise
        return False


def _verify(secret: str, stored: str) -> bool:
    if not isinstance(secret, str) or not isinstance(stored, str):
        return False
    if not secret or len(secret) > MAX_SECRET_LENGTH:
        return False
    raw = secret.encode("utf-8")
    parts = stored.split("$")
    if parts[0] == "scrypt" and len(parts) == 6:
        n, r, p = (_parse_int(x) for x in parts[1:4])
        if not (2 <= n <= SCRYPT_MAX_N and n & (n - 1) == 0):
            return False
        if not (1 <= r <= SCRYPT_MAX_R and 1 <= p <= SCRYPT_MAX_P):
            return False
        if n * r * p > SCRYPT_MAX_COST:
            return False
        salt, expected = _b64decode(parts[4]), _b64decode(parts[5])
        if not 16 <= len(expected) <= 64:
            return False
        actual = _scrypt(raw, salt, n, r, p, len(expected))
        return hmac.compare_digest(actual, expected)
    if parts[0] == "sha256" and len(parts) == 3:
        salt, expected = _b64decode(parts[1]), _b64decode(parts[2])
        if len(expected) != hashlib.sha256().digest_size:
            return False
        return hmac.compare_digest(_sha256(raw, salt), expected)
    return False


def hash_cost(stored: str) -> int:
    """The work `verify_client_secret` does for `stored`, in units of one scrypt block mix
    (``n * r * p``); 1 for ``sha256`` and 0 for a value that would not verify anyway."""
    parts = stored.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = (_parse_int(x) for x in parts[1:4])
            valid = 2 <= n <= SCRYPT_MAX_N and n & (n - 1) == 0 and 1 <= r <= SCRYPT_MAX_R
            if valid and 1 <= p <= SCRYPT_MAX_P and n * r * p <= SCRYPT_MAX_COST:
                return n * r * p
            return 0
    except ValueError:
        return 0
    return 1 if parts[0] == "sha256" and len(parts) == 3 else 0


def dummy_like(stored: str | None) -> str:
    """A stored value of the same kind and parameters as `stored` (default scrypt when None or
    malformed) that no secret verifies: random salt and random hash. Verifying against it costs
    what verifying against `stored` costs."""
    salt = _b64encode(secrets.token_bytes(SALT_BYTES))
    if stored is not None and hash_cost(stored) > 0:
        parts = stored.split("$")
        if parts[0] == "sha256":
            return f"sha256${salt}${_b64encode(secrets.token_bytes(32))}"
        length = len(_b64decode(parts[5]))
        if 16 <= length <= 64:
            digest = _b64encode(secrets.token_bytes(length))
            return f"scrypt${parts[1]}${parts[2]}${parts[3]}${salt}${digest}"
    digest = _b64encode(secrets.token_bytes(HASH_BYTES))
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt}${digest}"


class SecretVerifierBusy(Exception):
    """More secret checks are running and waiting than the verifier allows; retry shortly."""


class SecretVerifier(Protocol):
    """Checks a presented secret against a stored hash without blocking the event loop."""

    async def verify(self, secret: str, stored: str, *, source: str = "") -> bool:
        """Whether `secret` matches `stored`; raises `SecretVerifierBusy` when saturated.
        `source` (the caller's address) lets the verifier share its threads fairly."""
        ...


class BoundedSecretVerifier:
    """`verify_client_secret` on `workers` threads of its own, with room for `queue` more checks
    waiting; beyond that `verify` raises `SecretVerifierBusy` at once instead of piling up.

    Waiting checks are served round-robin by source address, not first come first served: a
    source that queued many checks (wrong secrets at high concurrency) delays another source's
    check by at most one turn, not by its whole backlog.

    A ``sha256`` check (microseconds) runs inline; only scrypt goes to the pool. A thread's slot
    is held until its check has finished, even when the waiting request is cancelled. The
    bookkeeping lives on the event loop (one per broker process); threads only report back.
    """

    def __init__(
        self,
        *,
        workers: int,
        queue: int,
        check: Callable[[str, str], bool] = verify_client_secret,
    ) -> None:
        if workers < 1 or queue < 0:
            raise ValueError("workers must be at least 1 and queue at least 0")
        self._check = check
        self._workers = workers
        self._capacity = workers + queue
        self._admitted = 0  # running + waiting
        self._running = 0
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="secret-hash")

    @property
    def in_flight(self) -> int:
        """Checks running or waiting."""
        return self._admitted

    async def verify(self, secret: str, stored: str, *, source: str = "") -> bool:
        if stored.startswith("sha256$"):
            return self._check(secret, stored)
        if self._admitted >= self._capacity:
            raise SecretVerifierBusy("too many client secret checks in progress")
        self._admitted += 1
        try:
            await self._turn(source)
        except BaseException:
            self._admitted -= 1
            raise
        loop = asyncio.get_running_loop()
        try:
            future = self._executor.submit(self._check, secret, stored)
        except RuntimeError:  # shut down
            self._finished()
            raise SecretVerifierBusy("the secret verifier is shut down") from None

        def report(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing left to serve
                loop.call_soon_threadsafe(self._finished)

        future.add_done_callback(report)
        return await asyncio.wrap_future(future)

    async def _turn(self, source: str) -> None:
        """Wait until a thread is free for `source` (round-robin among waiting sources)."""
        if self._running < self._workers and not self._waiting:
            self._running += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(source, deque()).append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted, then cancelled: give back
                self._running -= 1
                self._grant()
            else:
                waiters = self._waiting.get(source)
                if waiters is not None and waiter in waiters:
                    waiters.remove(waiter)
                    if not waiters:
                        del self._waiting[source]
            raise

    def _grant(self) -> None:
        while self._running < self._workers and self._waiting:
            source, waiters = next(iter(self._waiting.items()))
            waiter = waiters.popleft()
            if waiters:
                self._waiting.move_to_end(source)
            else:
                del self._waiting[source]
            if not waiter.done():
                self._running += 1
                waiter.set_result(None)

    def _finished(self) -> None:
        self._admitted -= 1
        self._running -= 1
        self._grant()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
