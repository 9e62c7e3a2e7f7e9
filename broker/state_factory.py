"""Build the configured `StateStore` (the app calls this once per process)."""

from __future__ import annotations

from broker.clock import Clock
from broker.settings import StateConfig
from broker.state import InMemoryStateStore, StateStore
from secret_backends.config import resolve_secret_reference


def build_state_store(config: StateConfig, clock: Clock) -> StateStore:
    """`InMemoryStateStore` for ``kind: memory``; `RedisStateStore` for ``kind: redis``.

    The Redis password reference is read again for every new connection (a rotated secret
    file is picked up); nothing connects here, so a down Redis does not prevent startup and
    surfaces as `StateUnavailable` on use (callers fail closed).
    """
    if config.kind == "memory":
        return InMemoryStateStore(clock)
    from broker.state_redis import RedisStateStore  # redis is only imported when configured

    reference = config.password_ref
    if config.sentinel is not None:
        sentinel = config.sentinel
        sentinel_reference = sentinel.password_ref
        return RedisStateStore.via_sentinel(
            sentinel.service_name,
            sentinel.endpoints(),
            db=sentinel.db,
            clock=clock,
            key_prefix=config.key_prefix,
            socket_timeout=config.socket_timeout_seconds,
            connect_timeout=config.connect_timeout_seconds,
            max_connections=config.max_connections,
            password=(lambda: resolve_secret_reference(reference).reveal()) if reference else None,
            sentinel_password=(lambda: resolve_secret_reference(sentinel_reference).reveal())
            if sentinel_reference
            else None,
            tls=sentinel.tls,
            ssl_ca_certs=str(config.tls_ca_file) if config.tls_ca_file else None,
            min_replica_acks=config.min_replica_acks,
        )
    if config.url is None:  # the settings validator already refuses this
        raise ValueError("state: kind redis needs a url")
    return RedisStateStore(
        config.url,
        clock=clock,
        key_prefix=config.key_prefix,
        socket_timeout=config.socket_timeout_seconds,
        connect_timeout=config.connect_timeout_seconds,
        max_connections=config.max_connections,
        password=(lambda: resolve_secret_reference(reference).reveal()) if reference else None,
        ssl_ca_certs=str(config.tls_ca_file) if config.tls_ca_file else None,
        min_replica_acks=config.min_replica_acks,
    )
