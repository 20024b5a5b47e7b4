"""Resilience in the HTTP/2 + gRPC driver (http2_proxy), over real loopback sockets: fault
injection (abort, delay), the local rate limit, the maxRequests breaker, retries (status,
per-try timeout, gRPC trailers-only) and outlier ejection.

Clients: the small HTTP/2 client of tests/test_l7_http2_proxy.py (plain HTTP/2 and
gRPC-shaped requests: ``content-type: application/grpc``, a 5-byte message). Upstreams: the
scripted HTTP/2 server of that module, and the test app's HTTP/1.1 server where a test says
so. The decisions themselves are unit-tested in tests/test_resilience.py; here, what the
driver does with them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from nodeagent.proxy.l7 import http2
from nodeagent.proxy.l7.errors import GRPC_PERMISSION_DENIED, GRPC_RESOURCE_EXHAUSTED, GRPC_UNAVAILABLE
from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot
from tests.test_l7_http2_proxy import LO, NODE, NS, VIP, H2Client, Proxy, ScriptedServer, Upstream, eventually, run
from tests.test_l7_http2_proxy import service as make_service

pytestmark = pytest.mark.timeout(60)

GRPC_HEADERS = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
GRPC_PATH = "/hostmesh.testapp.v1.Echo/Echo"
EMPTY_MESSAGE = b"\x00\x00\x00\x00\x00"
FLAGS = b"x-hostmesh-flags"


def policy(spec: dict, name: str = "tp", target: str = "web") -> ConfigObject:
    return ConfigObject("TrafficPolicy", NS, name, json.dumps({"targetRef": {"kind": "Service", "name": target},
                                                              **spec}))


def fault(spec: dict, name: str = "fi", target: str = "web") -> ConfigObject:
    return ConfigObject("FaultInjection", NS, name, json.dumps({"targetRef": {"kind": "Service", "name": target},
                                                               **spec}))


def snapshot(endpoints, *config, app_protocol: str = "http2") -> NodeSnapshot:
    return NodeSnapshot(NODE, (make_service("web", VIP, endpoints, app_protocol=app_protocol),), config=config)


async def grpc_call(c: H2Client):
    return await c.get(GRPC_PATH, method=b"POST", headers=GRPC_HEADERS, body=EMPTY_MESSAGE)


def grpc_ok(conn, head) -> None:
    conn.answer(head.stream_id, EMPTY_MESSAGE, headers=[(b"content-type", b"application/grpc")],
                trailers=[(b"grpc-status", b"0")])


def grpc_unavailable(conn, head) -> None:
    conn.write(conn.codec.send_response(head.stream_id, 200, [(b"content-type", b"application/grpc"),
                                                              (b"grpc-status", b"14"),
                                                              (b"grpc-message", b"down")], end_stream=True))


def http_or_grpc(status: int = 200):
    def on_request(conn, head):
        if head.grpc:
            grpc_ok(conn, head)
        else:
            body = b"status %d" % status
            conn.write(conn.codec.send_response(head.stream_id, status, [(b"content-length", b"%d" % len(body))]))
            conn.write(conn.codec.send_data(head.stream_id, body, end_stream=True))
    return on_request


def destination(px: Proxy):
    states = [st for _, st in px.inputs.routes.resilience.items()]
    assert len(states) == 1
    return states[0]


def grpc_status(r) -> int:
    return int((r.trailers or r.headers)[b"grpc-status"])


# ============================================================================ fault injection
def test_fault_abort_100_percent_http_and_grpc_and_0_percent_never():
    async def main():
        s = await ScriptedServer(http_or_grpc()).start()
        px = await Proxy(snapshot([s.endpoint()], fault({"abort": {"percentage": 100, "httpStatus": 503}}))).start()
        c = await H2Client.connect(px.port)
        r = await c.get("/a")
        assert r.status == 503 and r.headers[FLAGS] == b"FI" and bytes(r.body) == b"fault filter abort"
        r = await grpc_call(c)  # httpStatus for a gRPC client: the mapped gRPC status, trailers-only
        assert r.status == 200 and int(r.headers[b"grpc-status"]) == GRPC_UNAVAILABLE and r.headers[FLAGS] == b"FI"
        assert px.count("503", "FI", protocol="http2") == 1 and px.count("200", "FI", protocol="grpc") == 1
        c.close()

        px.snapshot = snapshot([s.endpoint()], fault({"abort": {"percentage": 100, "grpcStatus": 7}}))
        c = await H2Client.connect(px.port)
        r = await grpc_call(c)
        assert int(r.headers[b"grpc-status"]) == GRPC_PERMISSION_DENIED and r.headers[FLAGS] == b"FI"
        r = await c.get("/b")  # grpcStatus for a client that is not gRPC: an HTTP status for it
        assert r.headers[FLAGS] == b"FI" and r.status in (403, 503)
        assert s.heads == []  # nothing reached the upstream
        c.close()

        # with a TrafficPolicy too, the destination counts the aborts
        px.snapshot = snapshot([s.endpoint()], fault({"abort": {"percentage": 100, "httpStatus": 418}}),
                               policy({"connectionPool": {"maxRequests": 100}}))
        c = await H2Client.connect(px.port)
        r = await c.get("/c")
        assert r.status == 418 and r.headers[FLAGS] == b"FI"
        assert destination(px).faults_aborted_total == 1 and destination(px).active == 0
        c.close()

        px.snapshot = snapshot([s.endpoint()], fault({"abort": {"percentage": 0, "httpStatus": 503}}))
        c = await H2Client.connect(px.port)
        replies = await asyncio.gather(*(c.get(f"/n{i}") for i in range(50)), *(grpc_call(c) for _ in range(10)))
        assert all(r.status == 200 and FLAGS not in r.headers for r in replies)
        assert all(grpc_status(r) == 0 for r in replies[50:])
        assert len(s.heads) == 60
        c.close()
        px.close()
        s.close()
    run(main())


def test_fault_delay_holds_the_request_and_its_body_then_forwards_and_a_reset_cancels_it():
    async def main():
        up = await Upstream("v1").start()
        px = await Proxy(snapshot([up.endpoint()], fault({"delay": {"percentage": 100, "fixedDelay": "200ms"}}),
                                  app_protocol="")).start()
        c = await H2Client.connect(px.port)
        t0 = time.monotonic()
        r = await c.get("/slow")
        assert time.monotonic() - t0 >= 0.2
        assert r.status == 200 and json.loads(r.body)["path"] == "/slow"
        # a body sent during the delay waits (flow-controlled) and then goes upstream whole
        payload = bytes(range(256)) * 300  # 76800 bytes: more than the initial stream window
        t0 = time.monotonic()
        r = await c.get("/echo", method=b"POST", body=payload)
        assert time.monotonic() - t0 >= 0.2
        assert r.status == 200 and bytes(r.body) == payload
        assert px.count("200", "DI", protocol="http2") == 2  # delayed, otherwise fine
        # the client gives up during the delay: the request never goes upstream
        before = up.log.getvalue().count("/gone")
        sid, r = c.request("/gone")
        await asyncio.sleep(0.05)  # not in the same read as the request (the codec drops such a pair)
        c.t.write(c.codec.reset(sid, http2.CANCEL))
        await eventually(lambda: px.count("0", "DC", protocol="http2") == 1)
        await asyncio.sleep(0.35)
        assert up.log.getvalue().count("/gone") == before == 0
        assert (await c.get("/after")).status == 200  # the connection is fine
        c.close()
        px.close()
        up.close()
    run(main())


def test_fault_delay_then_abort_for_grpc():
    async def main():
        s = await ScriptedServer(http_or_grpc()).start()
        px = await Proxy(snapshot([s.endpoint()], fault({"delay": {"percentage": 100, "fixedDelay": "200ms"},
                                                         "abort": {"percentage": 100, "grpcStatus": 8}}))).start()
        c = await H2Client.connect(px.port)
        t0 = time.monotonic()
        r = await grpc_call(c)
        assert time.monotonic() - t0 >= 0.2
        assert int(r.headers[b"grpc-status"]) == GRPC_RESOURCE_EXHAUSTED and r.headers[FLAGS] == b"FI"
        assert s.heads == []
        c.close()
        px.close()
        s.close()
    run(main())


# ============================================================================ rate limit
def test_rate_limit_5_per_second_burst_5_the_6th_gets_429_or_resource_exhausted_with_retry_after():
    async def main():
        s = await ScriptedServer(http_or_grpc()).start()
        px = await Proxy(snapshot([s.endpoint()], policy({"rateLimit": {"requestsPerUnit": 5, "unit": "second",
                                                                        "burst": 5}}))).start()
        c = await H2Client.connect(px.port)
        replies = await asyncio.gather(*(c.get(f"/r{i}") for i in range(6)))
        codes = sorted(r.status for r in replies)
        assert codes == [200] * 5 + [429], codes
        limited = next(r for r in replies if r.status == 429)
        assert limited.headers[FLAGS] == b"RL" and limited.headers[b"retry-after"] == b"1"
        assert len(s.heads) == 5
        await asyncio.sleep(0.25)  # 5 tokens a second: one more is there
        replies = await asyncio.gather(*(grpc_call(c) for _ in range(3)))
        statuses = sorted(grpc_status(r) for r in replies)
        assert statuses[0] == 0 and statuses[-1] == GRPC_RESOURCE_EXHAUSTED, statuses
        limited = next(r for r in replies if grpc_status(r) == GRPC_RESOURCE_EXHAUSTED)
        assert limited.status == 200 and limited.headers[FLAGS] == b"RL" and b"retry-after" in limited.headers
        assert px.count("429", "RL", protocol="http2") == 1 and px.count("200", "RL", protocol="grpc") >= 1
        assert destination(px).rate_limited_total == 1 + sum(grpc_status(r) == GRPC_RESOURCE_EXHAUSTED
                                                             for r in replies)
        c.close()
        px.close()
        s.close()
    run(main())


# ============================================================================ maxRequests
def test_max_requests_1_the_second_concurrent_request_gets_503_uo_and_the_upstream_sees_one():
    async def main():
        held = []
        s = await ScriptedServer(lambda conn, head: held.append((conn, head.stream_id))).start()
        px = await Proxy(snapshot([s.endpoint()], policy({"connectionPool": {"maxRequests": 1}}))).start()
        c = await H2Client.connect(px.port)
        _, first = c.request("/1")
        await eventually(lambda: held)
        second = await c.get("/2")
        assert second.status == 503 and second.headers[FLAGS] == b"UO"
        assert b"too many requests" in bytes(second.body)
        r = await grpc_call(c)
        assert int(r.headers[b"grpc-status"]) == GRPC_UNAVAILABLE and r.headers[FLAGS] == b"UO"
        assert len(s.heads) == 1 and destination(px).active == 1
        conn, sid = held.pop()
        conn.answer(sid, b"one")
        assert bytes((await asyncio.wait_for(first.done, 10)).body) == b"one"
        await eventually(lambda: destination(px).active == 0)
        # a request the client resets gives its slot back too
        sid, r = c.request("/reset-me")
        await eventually(lambda: held)
        held.clear()
        c.t.write(c.codec.reset(sid, http2.CANCEL))
        await eventually(lambda: destination(px).active == 0)
        _, third = c.request("/3")
        await eventually(lambda: held)
        conn, sid = held.pop()
        conn.answer(sid, b"three")
        assert (await asyncio.wait_for(third.done, 10)).status == 200
        assert px.count("503", "UO", protocol="http2") == 1 and px.count("200", "UO", protocol="grpc") == 1
        assert destination(px).overflow_total == 2
        await eventually(lambda: destination(px).active == 0)
        c.close()
        px.close()
        s.close()
    run(main())


# ============================================================================ retries
def test_retries_on_5xx_every_get_succeeds_a_post_is_not_retried():
    async def main():
        bad = await ScriptedServer(http_or_grpc(503)).start()
        good = await ScriptedServer(http_or_grpc(200)).start()
        px = await Proxy(snapshot([bad.endpoint(), good.endpoint()],
                                  policy({"retries": {"attempts": 2, "retryOn": ["5xx"]}}))).start()
        c = await H2Client.connect(px.port)
        for i in range(20):
            r = await c.get(f"/g{i}")
            assert r.status == 200 and bytes(r.body) == b"status 200", i
        # round robin (a retry's pick takes a turn too): every request may have gone there first
        assert len(bad.heads) >= 1 and len(good.heads) == 20
        dest = destination(px)
        assert dest.retries_total == {"5xx": len(bad.heads)} and px.inputs.metrics.retries["5xx"] == len(bad.heads)
        assert dest.retries_active == 0 and dest.active == 0
        assert px.count("200", protocol="http2") == 20
        # POST: not idempotent, not retried: the 503 goes to the client as it is
        tried = len(bad.heads)
        replies = [await c.get(f"/p{i}", method=b"POST", body=b"data") for i in range(4)]
        assert sorted(r.status for r in replies) == [200, 200, 503, 503]
        assert len(bad.heads) == tried + 2 and dest.retries_total == {"5xx": tried}
        c.close()
        px.close()
        bad.close()
        good.close()
    run(main())


def test_retries_over_http1_upstreams_replay_the_body_on_another_endpoint():
    async def main():
        v1, v2 = await Upstream("v1").start(), await Upstream("v2").start()
        px = await Proxy(snapshot([v1.endpoint(), v2.endpoint()], policy({"retries": {
            "attempts": 1, "retryOn": ["5xx"], "retryNonIdempotent": True}}), app_protocol="")).start()
        c = await H2Client.connect(px.port)
        for i in range(6):  # v1 answers 503 to these, v2 200
            r = await c.get(f"/x{i}?status=503&pod=v1")
            assert r.status == 200 and json.loads(r.body)["pod"] == "v2"
        for i in range(4):
            r = await c.get(f"/echo?status=503&pod=v1&i={i}", method=b"POST", body=b"payload %d" % i)
            assert r.status == 200 and bytes(r.body) == b"payload %d" % i
        assert destination(px).retries_total["5xx"] >= 4
        # only v1 left: one retry, then the 503 as it is; flag URX in the metrics
        px.snapshot = snapshot([v1.endpoint()], policy({"retries": {"attempts": 1, "retryOn": ["5xx"]}}),
                               app_protocol="")
        c2 = await H2Client.connect(px.port)
        r = await c2.get("/y?status=503&pod=v1")
        assert r.status == 503 and FLAGS not in r.headers
        assert px.count("503", "URX", protocol="http2") == 1
        c.close()
        c2.close()
        px.close()
        v1.close()
        v2.close()
    run(main())


def test_per_try_timeout_retries_on_another_endpoint_when_the_first_hangs():
    async def main():
        hang = await ScriptedServer(lambda conn, head: None).start()
        good = await ScriptedServer(http_or_grpc(200)).start()
        retries = {"attempts": 2, "perTryTimeout": "100ms", "retryOn": ["gateway-error"]}
        px = await Proxy(snapshot([hang.endpoint(), good.endpoint()], policy({"retries": retries}))).start()
        c = await H2Client.connect(px.port)
        for i in range(6):
            r = await c.get(f"/t{i}")
            assert r.status == 200, i
        assert len(hang.heads) >= 2
        await eventually(lambda: len(hang.resets) == len(hang.heads))  # abandoned tries are cancelled
        assert destination(px).retries_total == {"per_try_timeout": len(hang.heads)}
        # only the hanging one: 3 tries of 100 ms, then 504 UT (URX in the metrics)
        px.snapshot = snapshot([hang.endpoint()], policy({"retries": retries}))
        c2 = await H2Client.connect(px.port)
        t0 = time.monotonic()
        r = await c2.get("/hang")
        assert r.status == 504 and r.headers[FLAGS] == b"UT"
        assert time.monotonic() - t0 >= 0.3
        assert px.count("504", "URX", protocol="http2") == 1
        c.close()
        c2.close()
        px.close()
        hang.close()
        good.close()
    run(main())


def test_grpc_trailers_only_unavailable_is_retried_with_retry_on_unavailable():
    async def main():
        bad = await ScriptedServer(grpc_unavailable).start()
        good = await ScriptedServer(grpc_ok).start()
        # gRPC calls are POSTs, retried on their retryOn statuses alone (resilience.RetryPolicy.method_ok)
        retries = {"attempts": 2, "retryOn": ["unavailable"]}
        px = await Proxy(snapshot([bad.endpoint(), good.endpoint()], policy({"retries": retries}))).start()
        c = await H2Client.connect(px.port)
        replies = [await grpc_call(c) for _ in range(10)]
        assert [grpc_status(r) for r in replies] == [0] * 10
        assert len(bad.heads) >= 1 and destination(px).retries_total == {"grpc": len(bad.heads)}
        # the request body was replayed on the good endpoint each time
        assert good.received == len(EMPTY_MESSAGE) * 10
        # only the failing one: retried, then its answer as it is
        px.snapshot = snapshot([bad.endpoint()], policy({"retries": retries}))
        c2 = await H2Client.connect(px.port)
        n = len(bad.heads)
        r = await grpc_call(c2)
        assert int(r.headers[b"grpc-status"]) == GRPC_UNAVAILABLE and r.headers[b"grpc-message"] == b"down"
        assert len(bad.heads) == n + 3
        assert px.count("200", "URX", protocol="grpc") == 1
        c.close()
        c2.close()
        px.close()
        bad.close()
        good.close()
    run(main())


# ============================================================================ outlier detection
def test_outlier_detection_ejects_after_3_consecutive_5xx_and_brings_it_back_after_base_ejection_time():
    async def main():
        bad = await ScriptedServer(http_or_grpc(503)).start()
        good = await ScriptedServer(http_or_grpc(200)).start()
        od = {"consecutive5xxErrors": 3, "interval": "10s", "baseEjectionTime": "500ms", "maxEjectionPercent": 50}
        px = await Proxy(snapshot([bad.endpoint(), good.endpoint()], policy({"outlierDetection": od}))).start()
        c = await H2Client.connect(px.port)
        statuses = []
        while len(bad.heads) < 3:
            statuses.append((await c.get("/o")).status)
            assert len(statuses) < 20
        ejected_at = time.monotonic()
        assert statuses.count(503) == 3
        dest = destination(px)
        assert dest.outlier.ejections_total == 1
        for _ in range(10):  # ejected: every request goes to the good endpoint
            assert (await c.get("/o")).status == 200
        assert len(bad.heads) == 3
        if time.monotonic() - ejected_at < 0.5:
            await asyncio.sleep(0.5 - (time.monotonic() - ejected_at) + 0.05)
        for _ in range(4):  # back after baseEjectionTime
            await c.get("/o")
        assert len(bad.heads) >= 4
        c.close()
        px.close()
        bad.close()
        good.close()
    run(main())


def test_connect_failure_is_retried_on_another_endpoint_and_counted():
    async def main():
        with socket.socket() as sock:  # a loopback port nobody listens on
            sock.bind(("127.0.0.1", 0))
            dead_port = sock.getsockname()[1]
        good = await ScriptedServer(http_or_grpc(200)).start()
        dead = Endpoint(LO, dead_port, NODE, "dead", NS)
        px = await Proxy(snapshot([dead, good.endpoint()], policy({"retries": {"attempts": 1}}))).start()
        c = await H2Client.connect(px.port)
        replies = [await c.get(f"/c{i}") for i in range(6)]
        assert [r.status for r in replies] == [200] * 6
        n = destination(px).retries_total.get("connect_failure", 0)
        assert n >= 1 and px.inputs.metrics.retries["connect_failure"] == n
        # retries are counted per try: the dead endpoint's ejection is not configured, so it keeps
        # being picked first now and then, and each time the retry goes to the good one
        c.close()
        px.close()
        good.close()
    run(main())
