"""Secret stores (Vault/OpenBao, AWS Secrets Manager): see issue 3."""
