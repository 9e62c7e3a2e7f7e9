"""Agent identity broker. The Python client for agents and gateways is `broker.client`."""

from broker.client import AgentClient, BrokerClientError, BrokerUnavailable, GatewayClient

__all__ = ["AgentClient", "BrokerClientError", "BrokerUnavailable", "GatewayClient"]
