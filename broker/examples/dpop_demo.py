"""DPoP (RFC 9449) in four steps, for the `make dev` walkthrough: an agent binds its token to its
own key, a gateway forwards the agent's proof and is served the credential, and the same token
without a proof, or with a replayed one, unlocks nothing.

    python -m broker.examples.dpop_demo --broker URL --person-token TOKEN \\
        --agent-secret SECRET --gateway-secret SECRET

It plays the agent (`AgentClient(dpop=True)`) and the gateway (`GatewayClient.fetch` with the
agent's ``DPoP`` header as `dpop_proof`). No key value is printed, only its version.
"""

from __future__ import annotations

import argparse
import json
import sys

import jwt

from broker.client import AgentClient, BrokerClientError, GatewayClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--person-token", required=True)
    parser.add_argument("--agent", default="triage-agent")
    parser.add_argument("--agent-secret", required=True)
    parser.add_argument("--gateway", default="llm-gateway")
    parser.add_argument("--gateway-secret", required=True)
    parser.add_argument("--gateway-url", default="http://127.0.0.1:8090/v1")
    parser.add_argument("--credential", default="openai-api-key")
    args = parser.parse_args(argv)

    with (
        AgentClient(args.broker, args.agent, args.agent_secret, dpop=True) as agent,
        GatewayClient(args.broker, args.gateway, args.gateway_secret) as gateway,
    ):
        token = agent.exchange(args.person_token, scope="llm:openai:chat", audience=args.gateway)
        claims = jwt.decode(token.access_token, options={"verify_signature": False})
        print(f"1. token_type {token.token_type}, bound to cnf.jkt {claims['cnf']['jkt']}")
        assert agent.dpop_key is not None and claims["cnf"]["jkt"] == agent.dpop_key.jkt

        call = f"{args.gateway_url}/chat/completions"
        headers = agent.headers_for("POST", call, token)
        served = gateway.fetch(args.credential, token, dpop_proof=headers["DPoP"])
        print(f"2. the gateway forwards the agent's proof: served {served.name} "
              f"version {served.version}")

        for step, what, proof in (
            (3, "the token alone (a stolen copy)", None),
            (4, "the same proof again (a replay)", headers["DPoP"]),
        ):
            try:
                gateway.fetch(args.credential, token, dpop_proof=proof)
            except BrokerClientError as refused:
                print(f"{step}. {what}: refused, {refused.error}: {refused.description}")
            else:
                print(f"{step}. {what}: SERVED (unexpected)")
                return 1
    print(json.dumps({"dpop": "ok"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
