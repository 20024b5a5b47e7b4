"""Retries, budgets, breaker, outlier ejection, rate limits and faults in the HTTP/1.1 driver,
over real loopback sockets (the test app's ``status``/``delay``/``fail``/``pod`` knobs)."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from dataclasses import replace

import pytest

from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot
from tests import test_l7_http1_proxy as h1t
from tests.test_l7_http1_proxy import LO, NODE, NS, VIP, Proxy, Upstream, get, run, service

pytestmark = pytest.mark.timeout(120)


def policy(spec: dict, name: str = "web") -> ConfigObject:
    return ConfigObject("TrafficPolicy", NS, f"{name}-tp", json.dumps({"targetRef": {"kind": "Service", "name": name},
                                                                       **spec}))


def fault(spec: dict, target: dict | None = None) -> ConfigObject:
    return ConfigObject("FaultInjection", NS, "web-fault", json.dumps(
        {"targetRef": target or {"kind": "Service", "name": "web"}, **spec}))


def snapshot(ups, *config, extra_endpoints=(), app_protocol: str = "") -> NodeSnapshot:
    svc = service("web", VIP, [u.endpoint() for u in ups] + list(extra_endpoints))
    if app_protocol:  # the upstream leg is an HTTP/2 stream (the test app speaks h2c too)
        svc = replace(svc, ports=tuple(replace(p, app_protocol=app_protocol) for p in svc.ports))
    return NodeSnapshot(NODE, (svc,), config=tuple(config))


def session(port: int, n: int, path: str = "/", method: str = "GET", body=None):
    """``n`` requests on one keep-alive connection: [(status, flags, pod)]."""
    c = http.client.HTTPConnection(LO, port, timeout=30)
    out = []
    try:
        for _ in range(n):
            c.request(method, path, body=body)
            r = c.getresponse()
            r.read()
            out.append((r.status, r.getheader("x-hostmesh-flags") or "", r.getheader("x-testapp-pod") or ""))
    finally:
        c.close()
    return out


def stat(px: Proxy, name: str, **labels) -> float:
    for m in px.registry.collect():
        for s in m.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def rig(pods, *config, **kw):
    """Upstreams named after ``pods`` behind the HTTP/1.1 driver (``kw``: see ``snapshot``)."""
    ups = [await Upstream(p).start() for p in pods]
    px = await Proxy(snapshot(ups, *config, **kw)).start()
    return ups, px


def close(ups, px):
    px.close()
    for u in ups:
        u.close()


# ------------------------------------------------------------------ retries
UPSTREAM_LEGS = pytest.mark.parametrize("leg", ["", "http2"], ids=["h1-upstream", "h2-upstream"])


@UPSTREAM_LEGS
def test_a_failing_endpoint_is_retried_on_the_other_one(leg):
    async def main():
        ups, px = await rig("ab", policy({"retries": {"attempts": 2, "retryOn": ["5xx"]}}), app_protocol=leg)
        got = await asyncio.to_thread(session, px.port, 20, "/?pod=a&status=503")
        assert {g[:2] for g in got} == {(200, "")} and {g[2] for g in got} == {"b"}
        # round robin: every first try lands on a, every retry on b
        assert ups[0].requests == 20 and ups[1].requests == 20
        assert stat(px, "hostmesh_agent_upstream_retries_total", reason="5xx") == 20
        assert px.count("200") == 20 and px.count("503") == 0  # one observation per client request
        close(ups, px)
    run(main())


def test_half_failing_upstream_becomes_over_99_percent_success_and_post_is_not_retried():
    async def main():
        ups, px = await rig("a", policy({"retries": {"attempts": 10, "retryOn": ["5xx"],
                                                     "backoff": {"baseInterval": "1ms"}}}))
        got = await asyncio.to_thread(session, px.port, 200, "/?fail=0.5&status=503")
        ok = sum(1 for g in got if g[0] == 200)
        assert ok >= 198, ok
        before = ups[0].requests
        posts = await asyncio.to_thread(session, px.port, 40, "/?fail=0.5&status=503", "POST", b"x")
        assert ups[0].requests - before == 40  # never replayed
        assert 5 < sum(1 for g in posts if g[0] == 503) < 35
        close(ups, px)
    run(main())


@UPSTREAM_LEGS
def test_retry_non_idempotent_replays_the_body(leg):
    async def main():
        ups, px = await rig("ab", policy({"retries": {"attempts": 1, "retryOn": ["5xx"], "retryNonIdempotent": True}}),
                            app_protocol=leg)

        def posts():
            c = http.client.HTTPConnection(LO, px.port, timeout=30)
            out = []
            for _ in range(4):
                c.request("POST", "/?pod=a&status=503", body=b"payload-123")
                r = c.getresponse()
                out.append((r.status, json.loads(r.read())["body_bytes"]))
            c.close()
            return out
        # (an /echo answer would start before the body is read: such a request is not retried)
        assert await asyncio.to_thread(posts) == [(200, 11)] * 4
        assert ups[0].requests == 4 and ups[1].requests == 4
        close(ups, px)
    run(main())


def test_budget_caps_retries_under_a_fully_failing_upstream():
    async def main():
        spec = {"retries": {"attempts": 2, "retryOn": ["5xx"], "backoff": {"baseInterval": "50ms"},
                            "budget": {"percent": 20, "minRetryConcurrency": 0}}}
        ups, px = await rig("a", policy(spec))
        clients, each = 20, 5
        await asyncio.gather(*(asyncio.to_thread(session, px.port, each, "/?status=503&delay=0.02")
                               for _ in range(clients)))
        originals = clients * each
        upstream = ups[0].requests
        # without a budget every request would be tried 3 times (300); 20 % of the requests
        # in flight may be retries at once
        assert originals < upstream <= originals * 1.45, upstream
        st = px.inputs.routes.resilience.peek(("shop", "web", 80))
        assert st.retry_overflow_total > 0 and st.retries_active == 0 and st.active == 0
        close(ups, px)
    run(main())


@UPSTREAM_LEGS
def test_connect_failure_is_retried_elsewhere(leg):
    async def main():
        dead = Endpoint(LO, 1, NODE, "dead", NS)
        ups, px = await rig("a", policy({"retries": {"attempts": 1, "retryOn": ["connect-failure"]}}),
                            extra_endpoints=[dead], app_protocol=leg)
        got = await asyncio.to_thread(session, px.port, 6)
        assert {g[:2] for g in got} == {(200, "")}
        assert stat(px, "hostmesh_agent_upstream_retries_total", reason="connect_failure") >= 1
        close(ups, px)
    run(main())


@UPSTREAM_LEGS
def test_per_try_timeout_and_retry_recover_a_hanging_first_try(leg):
    async def main():
        spec = {"timeout": "5s", "retries": {"attempts": 1, "perTryTimeout": "200ms", "retryOn": ["5xx"]}}
        ups, px = await rig("ab", policy(spec), app_protocol=leg)
        t0 = time.monotonic()
        got = await asyncio.to_thread(session, px.port, 2, "/?pod=a&delay=10")
        took = time.monotonic() - t0
        assert [g[:3] for g in got] == [(200, "", "b"), (200, "", "b")]
        assert took < 3, took
        assert stat(px, "hostmesh_agent_upstream_retries_total", reason="per_try_timeout") >= 1
        close(ups, px)
    run(main())


def test_per_try_timeout_without_retries_left_is_504_ut():
    async def main():
        ups, px = await rig("a", policy({"retries": {"attempts": 1, "perTryTimeout": "100ms", "retryOn": ["5xx"]}}))
        got = await asyncio.to_thread(session, px.port, 1, "/?delay=10")
        assert got[0][:2] == (504, "UT")
        close(ups, px)
    run(main())


def test_retries_exhausted_forward_the_last_answer_flagged_urx():
    async def main():
        ups, px = await rig("a", policy({"retries": {"attempts": 2, "retryOn": ["5xx"],
                                                     "backoff": {"baseInterval": "1ms"}}}))
        got = await asyncio.to_thread(session, px.port, 1, "/?status=500")
        assert got[0][:2] == (500, "") and ups[0].requests == 3
        assert px.count("500", "URX") == 1
        close(ups, px)
    run(main())


def test_long_retry_after_is_not_waited_for():
    async def main():
        ups, px = await rig("a", policy({"retries": {"attempts": 2, "retryOn": ["5xx"]}}))
        got = await asyncio.to_thread(session, px.port, 1, "/?status=503&header=Retry-After:120")
        assert got[0][0] == 503 and ups[0].requests == 1
        close(ups, px)
    run(main())


# ------------------------------------------------------------------ outlier detection
@UPSTREAM_LEGS
def test_a_5xx_endpoint_is_ejected_then_returns(leg):
    async def main():
        spec = {"outlierDetection": {"consecutive5xxErrors": 3, "baseEjectionTime": "1s", "interval": "1s",
                                     "maxEjectionPercent": 50}}
        ups, px = await rig("ab", policy(spec), app_protocol=leg)
        got = await asyncio.to_thread(session, px.port, 30, "/?pod=a&status=503")
        assert ups[0].requests == 3 and sum(1 for g in got if g[0] == 503) == 3
        clusters = px.inputs.routes.resilience.peek(("shop", "web", 80)).describe()
        assert clusters["outlier"]["ejected"] == 1
        await asyncio.sleep(1.1)
        await asyncio.to_thread(session, px.port, 4, "/")
        assert ups[0].requests == 5  # back in the rotation
        close(ups, px)
    run(main())


# ------------------------------------------------------------------ breaker and rate limit
def test_max_requests_answers_503_uo_and_never_lets_more_through():
    async def main():
        ups, px = await rig("a", policy({"connectionPool": {"maxRequests": 2}}))
        results = await asyncio.gather(*(asyncio.to_thread(get, px.port, "/?delay=0.5") for _ in range(5)))
        codes = sorted(st for st, _, _ in results)
        assert codes == [200, 200, 503, 503, 503]
        assert {h["x-hostmesh-flags"] for st, h, _ in results if st == 503} == {"UO"}
        assert ups[0].requests == 2
        close(ups, px)
    run(main())


def test_rate_limit_answers_429_rl_with_retry_after():
    async def main():
        ups, px = await rig("a", policy({"rateLimit": {"requestsPerUnit": 5, "unit": "second"}}))

        def burst():
            c = http.client.HTTPConnection(LO, px.port, timeout=30)
            answers = []
            for _ in range(8):
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                answers.append((r.status, r.getheader("x-hostmesh-flags"), r.getheader("retry-after")))
            c.close()
            return answers
        answers = await asyncio.to_thread(burst)
        assert [a[0] for a in answers] == [200] * 5 + [429] * 3
        assert answers[-1][1:] == ("RL", "1")
        assert px.count("429", "RL") == 3
        close(ups, px)
    run(main())


# ------------------------------------------------------------------ faults
def test_fault_abort_and_delay():
    async def main():
        ups, px = await rig("a", fault({"abort": {"percentage": 100, "httpStatus": 418}}))
        got = await asyncio.to_thread(session, px.port, 3)
        assert [g[:2] for g in got] == [(418, "FI")] * 3 and ups[0].requests == 0
        px.snapshot = snapshot(ups, fault({"delay": {"percentage": 100, "fixedDelay": "200ms"}}))
        t0 = time.monotonic()
        st, _, body = await asyncio.to_thread(get, px.port, "/echo", None, "POST", b"delayed body")
        assert st == 200 and body == b"delayed body" and time.monotonic() - t0 >= 0.2
        assert px.count("200", "DI") == 1
        close(ups, px)
    run(main())


def test_fault_on_a_route_with_headers_only_hits_matching_requests():
    async def main():
        ups = [await Upstream("a").start()]
        svc = service("web", VIP, [ups[0].endpoint()])
        rt = h1t.route("web", {"parentRefs": h1t.parent(), "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]})
        f = fault({"abort": {"percentage": 100, "grpcStatus": 14}, "headers": [{"name": "x-chaos", "value": "1"}]},
                  {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "web"})
        px = await Proxy(NodeSnapshot(NODE, (svc,), config=(rt, f))).start()
        st, h, _ = await asyncio.to_thread(get, px.port, "/", {"x-chaos": "1"})
        assert (st, h["x-hostmesh-flags"]) == (503, "FI")  # UNAVAILABLE as HTTP
        st, _, _ = await asyncio.to_thread(get, px.port, "/", {"x-chaos": "0"})
        assert st == 200
        close(ups, px)
    run(main())


def test_abort_percentage_lands_within_five_points():
    async def main():
        ups, px = await rig("a", fault({"abort": {"percentage": 30, "httpStatus": 503}}))
        got = await asyncio.to_thread(session, px.port, 400)
        share = sum(1 for g in got if g[1] == "FI") / 400
        assert 0.25 <= share <= 0.35, share
        close(ups, px)
    run(main())


# ------------------------------------------------------------------ the remaining fields, each acted on
def test_retriable_status_codes_retry_only_those_codes():
    async def main():
        spec = {"retries": {"attempts": 1, "retryOn": ["retriable-status-codes"], "retriableStatusCodes": [429]}}
        ups, px = await rig("ab", policy(spec))
        got = await asyncio.to_thread(session, px.port, 4, "/?pod=a&status=429")
        assert {g[0] for g in got} == {200}
        got = await asyncio.to_thread(session, px.port, 4, "/?pod=a&status=503")
        assert sorted(g[0] for g in got) == [200, 200, 503, 503]  # a's 503s are not retried
        close(ups, px)
    run(main())


def test_consecutive_gateway_errors_eject_on_502_to_504_only():
    async def main():
        spec = {"outlierDetection": {"consecutive5xxErrors": 0, "consecutiveGatewayErrors": 2,
                                     "maxEjectionPercent": 50}}
        ups, px = await rig("ab", policy(spec))
        await asyncio.to_thread(session, px.port, 10, "/?pod=a&status=500")
        assert ups[0].requests == 5  # 500 is no gateway error: a keeps its share
        await asyncio.to_thread(session, px.port, 10, "/?pod=a&status=502")
        assert ups[0].requests == 7  # two 502s in a row, then ejected
        close(ups, px)
    run(main())


def test_rate_limit_burst_and_per_source_workload():
    async def main():
        spec = {"rateLimit": {"requestsPerUnit": 1, "unit": "hour", "burst": 3, "perSourceWorkload": True}}
        ups, px = await rig("a", policy(spec))
        got = await asyncio.to_thread(session, px.port, 5)
        assert [g[0] for g in got] == [200, 200, 200, 429, 429]
        st = px.inputs.routes.resilience.peek(("shop", "web", 80))
        assert st._limiter.sources() == ["unknown/unknown"]  # the client has no Workload in this snapshot
        close(ups, px)
    run(main())


def test_max_retries_caps_concurrent_retries():
    async def main():
        spec = {"retries": {"attempts": 1, "retryOn": ["5xx"], "backoff": {"baseInterval": "300ms",
                                                                          "maxInterval": "300ms"},
                            "budget": {"percent": 100, "minRetryConcurrency": 100}},
                "connectionPool": {"maxRetries": 1}}
        ups, px = await rig("a", policy(spec))
        results = await asyncio.gather(*(asyncio.to_thread(get, px.port, "/?status=503") for _ in range(6)))
        assert all(st == 503 for st, _, _ in results)
        st = px.inputs.routes.resilience.peek(("shop", "web", 80))
        assert st.retry_overflow_total >= 3 and ups[0].requests <= 6 + 3
        close(ups, px)
    run(main())
