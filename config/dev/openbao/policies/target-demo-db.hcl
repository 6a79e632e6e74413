# Task tokens for the `demo-db` target may read read-only PostgreSQL credentials, nothing else.
path "database/creds/demo-readonly" {
  capabilities = ["read"]
}
