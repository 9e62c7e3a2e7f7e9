#!/bin/sh
# One-shot, after OpenBao is healthy: seed the demo provider keys the policy's credentials name
# (policies/credentials.yaml) and give the brokers a least-privilege token of their own.
# Runs on every `docker compose up`: the dev server forgets everything when it restarts.
set -eu
BAO_TOKEN="$(cat /run/openbao-secrets/root-token)"
export BAO_TOKEN

demo_value() {
  # Random, and visibly not a real provider key.
  printf 'demo-only-%s' "$(head -c 18 /dev/urandom | base64 | tr -d '/+=')"
}

for path in llm/openai llm/anthropic; do
  if bao kv get -mount=secret "$path" >/dev/null 2>&1; then
    echo "secret/$path: kept"
  else
    bao kv put -mount=secret "$path" api_key="$(demo_value)" >/dev/null
    echo "secret/$path: seeded with a demo value"
  fi
done

bao policy write broker /deploy/openbao/broker-policy.hcl >/dev/null

token_file=/run/broker-secrets/vault-token
if [ -s "$token_file" ] && BAO_TOKEN="$(cat "$token_file")" bao token lookup >/dev/null 2>&1; then
  echo "broker token: still valid, kept"
else
  # Periodic and renewable: the broker renews it before it expires (renew_before_seconds).
  umask 077
  bao token create -policy=broker -orphan -period=24h -display-name=broker -field=token \
    > "$token_file.tmp"
  chown 10001:10001 "$token_file.tmp"
  chmod 0400 "$token_file.tmp"
  mv "$token_file.tmp" "$token_file"
  echo "broker token: created"
fi
