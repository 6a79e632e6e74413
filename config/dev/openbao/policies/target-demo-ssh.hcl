# Task tokens for the `demo-ssh` target may have an SSH public key signed.
path "ssh/sign/agent-ssh" {
  capabilities = ["update"]
}
