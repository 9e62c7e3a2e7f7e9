"""Runnable examples of the broker's callers, small enough to read in one sitting.

- `broker.examples.provider`: a stand-in LLM provider that accepts only its *current* API key
  (a rotation revokes the old one at once) and counts what it accepted and refused.
- `broker.examples.gateway`: an LLM gateway (FastAPI) that agents call with their broker-issued
  token; it fetches the provider key that token unlocks, per call, through
  `broker.client.GatewayClient`, and forwards the call with the key injected.

They are used by the end-to-end tests (``tests/integration/test_example_gateway_e2e.py``) and are
not part of the broker's service.
"""
