"""The issuance metrics take the target's kind from the body the handler validated (no second
JSON parse), and still from the raw body when the handler refused it."""

from __future__ import annotations

from datetime import timedelta

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from broker.core.model import Sensitivity, Target, TargetKind
from broker.http.metrics_routes import register_metrics_routes
from broker.http.problems import problem_middleware
from broker.http.wire import PARSED_BODY_KEY, CredentialRequestBody, parse_body
from broker.metrics import BrokerMetrics

TARGETS = {
    "demo-db": Target(
        name="demo-db",
        kind=TargetKind.DATABASE,
        policies=("p",),
        system="demo",
        environment="dev",
        sensitivity=Sensitivity.INTERNAL,
        max_ttl=timedelta(minutes=5),
        mount="database",
        role="demo-readonly",
    )
}


async def test_the_kind_comes_from_the_validated_body_or_else_the_raw_one() -> None:
    metrics = BrokerMetrics()
    parsed: list[object] = []

    async def handler(request: web.Request) -> web.Response:
        body = await parse_body(request, CredentialRequestBody)
        parsed.append(request.get(PARSED_BODY_KEY))
        return web.json_response({"target": body.target}, status=201)

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_post("/v1/credentials", handler)
    register_metrics_routes(app, metrics, targets=lambda: TARGETS)
    async with TestClient(TestServer(app)) as client:
        valid = {"workflow_id": "wf-1", "task_id": "t-1", "target": "demo-db"}
        assert (await client.post("/v1/credentials", json=valid)).status == 201
        refused = {**valid, "ttl_seconds": 0}  # invalid: 400, the target is still named
        assert (await client.post("/v1/credentials", json=refused)).status == 400
        unknown = {**valid, "target": "nope"}
        assert (await client.post("/v1/credentials", json=unknown)).status == 201
        text = await (await client.get("/metrics")).text()
    counted = {
        (s.labels["kind"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "tasklease_issuance"
        for s in family.samples
        if s.name == "tasklease_issuance_total"
    }
    assert counted == {
        ("database", "issued"): 1,
        ("database", "body.invalid"): 1,
        ("unknown", "issued"): 1,
    }
    assert [type(p) for p in parsed] == [CredentialRequestBody, CredentialRequestBody]
