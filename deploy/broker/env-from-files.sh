#!/bin/sh
# Entry point of the broker replicas in docker-compose.yml. The policy names client secrets as
# env:NAME references (policies/*.yaml); the init service generated one file per name. Export
# them to the broker process only, then become the command (`broker serve ...`).
set -eu
dir=/run/broker-secrets/env
for file in "$dir"/*; do
  [ -f "$file" ] || continue
  name="$(basename "$file")"
  case "$name" in
    *[!A-Za-z0-9_]* | [0-9]*) echo "env-from-files: skipping $name (not a variable name)" >&2; continue ;;
  esac
  export "$name=$(cat "$file")"
done
exec "$@"
