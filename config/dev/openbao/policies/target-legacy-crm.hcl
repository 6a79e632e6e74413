# Task tokens for the `legacy-crm` target (kind vault-token, legacy) may read the CRM's static
# integration secret, and nothing else.
path "kv/data/legacy/crm" {
  capabilities = ["read"]
}
