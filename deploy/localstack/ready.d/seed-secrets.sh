#!/bin/bash
# LocalStack ready hook: a demo secret in Secrets Manager, so the broker's `aws` backend
# (deploy/broker.yaml) has something to serve once a policy credential names it.
set -euo pipefail
if awslocal secretsmanager describe-secret --secret-id llm/openai >/dev/null 2>&1; then
  echo "llm/openai: kept"
else
  value="demo-only-$(head -c 18 /dev/urandom | base64 | tr -d '/+=')"
  awslocal secretsmanager create-secret --name llm/openai \
    --secret-string "{\"api_key\": \"${value}\"}" >/dev/null
  echo "llm/openai: seeded with a demo value"
fi
