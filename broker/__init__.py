"""Agent identity broker. The Python client for agents and gateways is `broker.client`.

The client's names are re-exported here lazily (PEP 562), so importing any module of the
package (``broker.types`` from an identity adapter, say) never drags the client in first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.client import (
        AgentClient,
        AsyncAgentClient,
        AsyncGatewayClient,
        BrokerClientError,
        BrokerUnavailable,
        GatewayClient,
    )

__all__ = [
    "AgentClient",
    "AsyncAgentClient",
    "AsyncGatewayClient",
    "BrokerClientError",
    "BrokerUnavailable",
    "GatewayClient",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from broker import client

        return getattr(client, name)
    raise AttributeError(f"module 'broker' has no attribute {name!r}")
