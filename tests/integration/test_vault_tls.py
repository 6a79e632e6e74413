"""The broker and OpenBao over TLS, on the dev stack's real HTTPS listener (a certificate for
127.0.0.1 from a CA made for the stack): with ``vault.ca_file`` the broker logs in, is ready,
and issues a PostgreSQL credential that works; each wrong trust stops start-up with a typed
error that says what OpenSSL said."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from broker.devstack import DevStack
from broker.errors import VaultUnavailableError
from tests.integration.clients import StartBroker, orders_as, ready_then_issue

pytestmark = pytest.mark.stack


async def test_a_broker_mints_over_tls_trusting_only_the_stacks_ca(
    stack: DevStack, start: StartBroker, tmp_path: Path
) -> None:
    endpoints = stack.endpoints
    assert endpoints is not None
    assert endpoints.openbao_tls_addr.startswith("https://")
    broker = await start(
        TASKLEASE_VAULT__ADDR=endpoints.openbao_tls_addr,
        TASKLEASE_VAULT__CA_FILE=endpoints.openbao_ca_file,
    )
    secret = (await ready_then_issue(stack, broker, tmp_path, "demo-db"))["secret"]
    # The token create, the database/creds read and the lease renewal all went over TLS.
    assert orders_as(stack, secret["username"], secret["password"]) > 0


@pytest.mark.parametrize(
    ("defect", "said"),
    [
        ("the system roots instead of the stack's CA", "TLS CERTIFICATE_VERIFY_FAILED"),
        ("a host the certificate does not name", "Hostname mismatch"),
    ],
)
async def test_a_wrong_trust_stops_start_up_saying_why(
    stack: DevStack, start: StartBroker, defect: str, said: str
) -> None:
    endpoints = stack.endpoints
    assert endpoints is not None
    env = {
        "TASKLEASE_VAULT__ADDR": endpoints.openbao_tls_addr,
        "TASKLEASE_VAULT__CA_FILE": endpoints.openbao_ca_file,
    }
    if defect.startswith("the system roots"):
        env["TASKLEASE_VAULT__CA_FILE"] = ""
    else:
        port = urlsplit(endpoints.openbao_tls_addr).port
        env["TASKLEASE_VAULT__ADDR"] = f"https://localhost:{port}"
    with pytest.raises(VaultUnavailableError) as caught:
        await start(**env)
    assert caught.value.reason == "vault.unreachable"
    assert said in str(caught.value)
