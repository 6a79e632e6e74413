"""Time a credential decision against the floor of a bare cedarpy ``is_authorized`` call.

Run: ``.venv/bin/python bench/bench_policy.py [iterations]`` (default 2000).

For policy sets of 10 and 100 policies (the shipped defaults plus synthetic policies about
other targets, so the decision itself is the same), both sides decide the same request:

* floor: ``cedarpy.is_authorized`` with the request dict, entity list and context the engine
  would build, a pre-parsed ``PolicySet`` and a pre-parsed ``Schema`` (per-request schema
  validation on, as in the engine). Nothing is built per call;
* broker: the decision as the broker makes it, through :class:`LivePolicy` (the hot-reloadable
  set in force) into :meth:`CedarPolicyEngine.decide` from a :class:`PolicyRequest`: builds
  principal, resource and context (participant matching, ticket, chain summary, working
  hours), calls cedarpy once, and interprets the answer (annotations, caps, fail-closed
  checks).

For context it also times the floor without per-request schema validation: what the
validation of the request and entities against the schema costs; and the floor with the
entities pre-parsed (a ``cedarpy.Entities`` handle): the engine parses each distinct entity
set (caller, target, run, chain) once and reuses it, so this is the floor of a repeated
decision, and the broker's time above it is what building the request and reading the
answer cost.

Rounds of each alternate to share any drift in CPU frequency or load; the best round of each
is reported (the least disturbed), with the median alongside. Goal: ratio <= 1.3.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cedarpy

from broker.core.model import (
    ActionName,
    DelegationHop,
    Sensitivity,
    Target,
    TargetKind,
    WorkflowRun,
)
from broker.core.policy import SCHEMA_FILE, CedarPolicyEngine, cedar_input_for
from broker.core.ports import PolicyRequest
from broker.policy_reload import LivePolicy

POLICY_DIR = Path(__file__).resolve().parent.parent / "config" / "policies"
NOW = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)
AGENT = "spiffe://tasklease.test/agent/demo"
ROUNDS = 7
GOAL = 1.3
SIZES = (10, 100)


def _synthetic(index: int) -> str:
    """A policy about a target the request is not for: evaluated, never satisfied."""
    if index % 2:
        return (
            f'@id("synthetic-forbid-{index}")\n'
            'forbid (principal, action == Action::"request_credential", resource)\n'
            f'when {{ resource.name == "synthetic-{index}" && context.ttl_seconds > {index} }};\n'
        )
    return (
        f'@id("synthetic-permit-{index}") @max_ttl("{60 + index}")\n'
        'permit (principal is Agent, action == Action::"request_credential", '
        "resource is Target)\n"
        f'when {{ resource.system == "synthetic-{index}" && '
        'principal.roles.contains(Role::"agent") };\n'
    )


def _policy_sources(size: int) -> dict[str, str]:
    shipped = {path.name: path.read_text() for path in sorted(POLICY_DIR.glob("*.cedar"))}
    shipped_count = len(cedarpy.PolicySet.from_str("\n".join(shipped.values())))
    extra = size - shipped_count
    if extra < 0:
        raise SystemExit(f"the shipped set already has {shipped_count} policies (> {size})")
    if extra:
        shipped["synthetic.cedar"] = "".join(_synthetic(i) for i in range(extra))
    return shipped


def _request() -> PolicyRequest:
    run = WorkflowRun(
        id="wf-1",
        owner="alice@example.test",
        purpose="nightly report",
        started_by="spiffe://tasklease.test/orchestrator/demo",
        created_at=NOW - timedelta(minutes=5),
        deadline=NOW + timedelta(hours=2),
        labels={"team": "data", "ticket": "OPS-1234"},
        participants=("spiffe://tasklease.test/agent/*",),
    )
    target = Target(
        name="demo-db",
        kind=TargetKind.DATABASE,
        policies=("target-demo-db",),
        system="demo-postgres",
        environment="dev",
        sensitivity=Sensitivity.INTERNAL,
        max_ttl=timedelta(minutes=15),
        mount="database",
        role="demo-readonly",
    )
    return PolicyRequest(
        principal=AGENT,
        principal_roles=frozenset({"agent"}),
        trust_domain="tasklease.test",
        action=ActionName.REQUEST_CREDENTIAL.value,
        target=target,
        run=run,
        chain=run.chain.extended(DelegationHop("agent", AGENT, verified=True)),
        task_id="task-1",
        tool="psql",
        justification="read yesterday's orders",
        ttl=timedelta(minutes=5),
        now=NOW,
    )


def _round_us(run: Callable[[], object], iterations: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(iterations):
        run()
    return (time.perf_counter_ns() - started) / iterations / 1000


def _bench(size: int, iterations: int) -> float:
    sources = _policy_sources(size)
    schema_text = (POLICY_DIR / SCHEMA_FILE).read_text()
    engine = CedarPolicyEngine(policies=sources, schema=schema_text)
    live = LivePolicy(engine)
    request = _request()
    cedar_input = cedar_input_for(request)
    policy_set = cedarpy.PolicySet.from_str("\n".join(sources.values()))
    schema = cedarpy.Schema.from_str(schema_text)
    entities = cedarpy.Entities.from_json_str(json.dumps(cedar_input.entities), schema)

    def floor() -> cedarpy.AuthzResult:
        return cedarpy.is_authorized(
            cedar_input.request, policy_set, cedar_input.entities, schema=schema
        )

    def unchecked() -> cedarpy.AuthzResult:
        return cedarpy.is_authorized(cedar_input.request, policy_set, cedar_input.entities)

    def preparsed() -> cedarpy.AuthzResult:
        return cedarpy.is_authorized(cedar_input.request, policy_set, entities, schema=schema)

    def broker() -> object:
        return live.decide(request)

    # All must agree before anything is timed.
    decision = engine.decide(request)
    if not (decision.allowed and floor().allowed and unchecked().allowed and preparsed().allowed):
        raise SystemExit(f"the benchmark request is not allowed: {decision.reasons}")
    warmup = max(iterations // 10, 50)
    for run in (floor, unchecked, preparsed, broker):
        _round_us(run, warmup)

    floor_rounds: list[float] = []
    unchecked_rounds: list[float] = []
    preparsed_rounds: list[float] = []
    broker_rounds: list[float] = []
    for _ in range(ROUNDS):
        floor_rounds.append(_round_us(floor, iterations))
        unchecked_rounds.append(_round_us(unchecked, iterations))
        preparsed_rounds.append(_round_us(preparsed, iterations))
        broker_rounds.append(_round_us(broker, iterations))

    floor_best, broker_best = min(floor_rounds), min(broker_rounds)
    ratio = broker_best / floor_best
    out = sys.stdout
    out.write(f"-- {len(engine.policies)} policies\n")
    out.write(
        f"floor  cedarpy.is_authorized (schema):     best {floor_best:8.1f} us/op, "
        f"median {statistics.median(floor_rounds):8.1f} us/op\n"
    )
    out.write(
        f"broker LivePolicy.decide:                  best {broker_best:8.1f} us/op, "
        f"median {statistics.median(broker_rounds):8.1f} us/op "
        f"(beyond the floor: {broker_best - floor_best:.1f} us/op)\n"
    )
    out.write(
        f"info   cedarpy.is_authorized (no schema):  best {min(unchecked_rounds):8.1f} us/op, "
        f"median {statistics.median(unchecked_rounds):8.1f} us/op\n"
    )
    out.write(
        f"info   cedarpy.is_authorized (pre-parsed entities, schema): best "
        f"{min(preparsed_rounds):8.1f} us/op, median {statistics.median(preparsed_rounds):8.1f} "
        f"us/op (broker/this: {broker_best / min(preparsed_rounds):.2f}x)\n"
    )
    out.write(
        f"ratio (best/best): {ratio:.2f}x  goal <= {GOAL}x  {'OK' if ratio <= GOAL else 'MISS'}\n"
    )
    return ratio


def main(argv: list[str]) -> int:
    """Run the benchmark and print the figures (``make bench`` asserts nothing)."""
    iterations = int(argv[1]) if len(argv) > 1 else 2000
    sys.stdout.write(f"iterations per round: {iterations}, rounds: {ROUNDS}\n")
    for size in SIZES:
        _bench(size, iterations)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
