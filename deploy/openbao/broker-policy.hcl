# What the broker may do in OpenBao: read the provider keys it serves, and check their versions
# without reading values (README, "Vault paths"). Nothing else: no writes, no other paths.
path "secret/data/llm/*" {
  capabilities = ["read"]
}

path "secret/metadata/llm/*" {
  capabilities = ["read"]
}
