# Task tokens for the `demo-kv` target (kind vault-token) may read the demo KV secrets.
path "kv/data/demo/*" {
  capabilities = ["read"]
}
