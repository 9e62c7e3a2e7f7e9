"""Agent identity broker. The Python client for agents and gateways is `broker.client`."""

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
