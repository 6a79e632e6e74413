# The broker's own OpenBao policy. It mints per-task child tokens only through the
# `tasklease-task` token role (whose allowed_policies bound what a task can get), revokes
# them by accessor, revokes and looks up leases, and lists accessors for the reconciler.
# It cannot read any secret itself: minting reads happen with the task token.

path "auth/token/create/tasklease-task" {
  capabilities = ["update"]
}

path "auth/token/lookup-accessor" {
  capabilities = ["update"]
}

path "auth/token/revoke-accessor" {
  capabilities = ["update"]
}

# The reconciler lists accessors to find tasklease-minted tokens the ledger does not know.
path "auth/token/accessors" {
  capabilities = ["list", "sudo"]
}

path "sys/leases/lookup" {
  capabilities = ["update"]
}

path "sys/leases/revoke" {
  capabilities = ["update"]
}

# Its own session: look itself up (remaining TTL) and renew.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

# Shorten a dynamic secret's lease to the task token's remaining TTL (a database role's
# default_ttl may be longer than the task): the lease then never outlives the task.
path "sys/leases/renew" {
  capabilities = ["update"]
}

# Start-up check (SECURITY 28): the broker reads its task token role and refuses to start if
# it would produce batch, periodic, renewable or non-orphan tokens.
path "auth/token/roles/tasklease-task" {
  capabilities = ["read"]
}
