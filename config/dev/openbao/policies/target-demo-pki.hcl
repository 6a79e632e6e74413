# Task tokens for the `demo-cert` target may issue a short-lived client certificate.
path "pki/issue/agent-cert" {
  capabilities = ["update"]
}
