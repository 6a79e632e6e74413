"""The pure pieces of the dev stack: placeholder filling and durations."""

from __future__ import annotations

from broker.devstack import _fill, _seconds, free_port


def test_placeholders_are_filled_but_vault_templates_are_kept() -> None:
    step = {
        "url": "postgresql://{{username}}:{{password}}@127.0.0.1:{pg_port}/demo",
        "keys": "{jwt_pubkeys}",
        "nested": [{"td": "spiffe://{trust_domain}/x"}],
        "flag": True,
    }
    filled = _fill(
        step, {"{pg_port}": "5432", "{jwt_pubkeys}": ["PEM"], "{trust_domain}": "t.test"}
    )
    assert filled == {
        "url": "postgresql://{{username}}:{{password}}@127.0.0.1:5432/demo",
        "keys": ["PEM"],
        "nested": [{"td": "spiffe://t.test/x"}],
        "flag": True,
    }


def test_durations() -> None:
    assert [_seconds("90"), _seconds("30s"), _seconds("5m"), _seconds("1h")] == [90, 30, 300, 3600]


def test_free_port_with_a_free_neighbour() -> None:
    port = free_port(also_next=True)
    assert 1024 < port < 65535
