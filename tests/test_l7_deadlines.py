"""Per-request deadlines in the HTTP drivers: route timeout, backendRequest, perTryTimeout
(with its retry) and grpc-timeout are honoured from the connection's one timer, without a
timer per request.

HTTP/1.1 (``http1_proxy``): deadlines on the exchange, the tick moved to the earliest;
HTTP/2 (``http2_proxy``): a per-connection heap of the streams' deadlines. Over real
loopback sockets, with the helpers of tests/test_l7_http1_proxy.py and
tests/test_l7_http2_proxy.py. The drivers' default limits tick every 5 s, so a 300 ms
timeout answered in time proves the tick was moved for it. Timing bounds are loose (a
shared machine): a deadline must never fire early, and late by well under a second.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import time

import pytest
import uvloop

from nodeagent.proxy.l7 import http1_proxy, http2_proxy
from nodeagent.proxy.l7.context import L7Limits
from nodeagent.proxy.l7.http2_proxy import serve_http2
from nodeagent.proxy.l7.shared import listen
from nodeagent.state import ConfigObject, NodeSnapshot
from tests import test_l7_http1_proxy as h1t
from tests import test_l7_http2_proxy as h2t

pytestmark = pytest.mark.timeout(120)

LO, NODE, NS, VIP = h1t.LO, h1t.NODE, h1t.NS, h1t.VIP
GRPC_HEADERS = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
GRPC_PATH = "/hostmesh.testapp.v1.Echo/Echo"
EMPTY_MESSAGE = b"\x00\x00\x00\x00\x00"
LATE = 0.8  # s a deadline may be late by here (the drivers' own bound is ~1 ms plus loop lag)
# the bench's policy (bench/resilience.py POLICY): the common path this is about
TYPICAL = {"timeout": "10s", "retries": {"attempts": 2, "perTryTimeout": "3s", "retryOn": ["5xx", "connect-failure"]},
           "connectionPool": {"maxRequests": 10000, "maxConnections": 1000},
           "outlierDetection": {"consecutive5xxErrors": 5, "baseEjectionTime": "30s"}}


def policy(spec: dict, name: str = "web") -> ConfigObject:
    return ConfigObject("TrafficPolicy", NS, f"{name}-tp",
                        json.dumps({"targetRef": {"kind": "Service", "name": name}, **spec}))


def h1_snapshot(ups, *config) -> NodeSnapshot:
    return NodeSnapshot(NODE, (h1t.service("web", VIP, [u.endpoint() for u in ups]),), config=tuple(config))


def h2_snapshot(endpoints, *config, app_protocol: str = "http2") -> NodeSnapshot:
    return NodeSnapshot(NODE, (h2t.service("web", VIP, endpoints, app_protocol=app_protocol),), config=tuple(config))


def get(port: int, path: str):
    """One request on its own connection: (status, flags, pod, seconds)."""
    c = http.client.HTTPConnection(LO, port, timeout=30)
    t0 = time.monotonic()
    try:
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        return r.status, r.getheader("x-hostmesh-flags") or "", r.getheader("x-testapp-pod") or "", \
            time.monotonic() - t0
    finally:
        c.close()


def session(port: int, n: int, path: str = "/") -> list[int]:
    """``n`` requests on one keep-alive connection: their statuses."""
    c = http.client.HTTPConnection(LO, port, timeout=30)
    out = []
    try:
        for _ in range(n):
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            out.append(r.status)
    finally:
        c.close()
    return out


def hang(conn, head) -> None:
    """A scripted HTTP/2 upstream that never answers."""


def answer(conn, head) -> None:
    conn.answer(head.stream_id, b"ok")


def grpc_headers(timeout: bytes | None) -> list:
    return GRPC_HEADERS + ([(b"grpc-timeout", timeout)] if timeout is not None else [])


async def timed(coro):
    t0 = time.perf_counter()
    r = await coro
    return r, time.perf_counter() - t0


# ============================================================================ HTTP/1.1
def test_h1_route_timeout_and_backend_request_timeout_fire_on_time_well_before_the_tick():
    async def main():
        v1, v2 = await h1t.start_all("v1", "v2")
        rules = [{"matches": [{"path": {"type": "PathPrefix", "value": "/req"}}], "timeouts": {"request": "300ms"},
                  "backendRefs": [{"name": "web-v1", "port": 80}]},
                 {"timeouts": {"backendRequest": "300ms"}, "backendRefs": [{"name": "web-v1", "port": 80}]}]
        px = await h1t.Proxy(h1t.two_versions(v1, v2, rules)).start()
        for path in ("/req?delay=5", "/be?delay=5"):
            st, flags, _, took = await asyncio.to_thread(get, px.port, path)
            assert (st, flags) == (504, "UT"), path
            assert 0.3 <= took < 0.3 + LATE, (path, took)
        st, _, _, _ = await asyncio.to_thread(get, px.port, "/req?delay=0.1")
        assert st == 200
        px.close()
        v1.close()
        v2.close()
    h1t.run(main())


def test_h1_per_try_timeout_retries_on_the_other_endpoint():
    async def main():
        ups = [await h1t.Upstream(p).start() for p in "ab"]
        spec = {"timeout": "5s", "retries": {"attempts": 1, "perTryTimeout": "250ms", "retryOn": ["5xx"]}}
        px = await h1t.Proxy(h1_snapshot(ups, policy(spec))).start()
        st, flags, pod, took = await asyncio.to_thread(get, px.port, "/?pod=a&delay=10")
        assert (st, flags, pod) == (200, "", "b")
        assert 0.25 <= took < 0.25 + LATE, took
        px.close()
        for u in ups:
            u.close()
    h1t.run(main())


def test_h1_route_timeout_covers_all_the_retries():
    async def main():
        ups = [await h1t.Upstream(p).start() for p in "ab"]
        # 11 tries of 250 ms would take 2.75 s and more; the route timeout ends it at 0.6 s
        spec = {"timeout": "600ms", "retries": {"attempts": 10, "perTryTimeout": "250ms", "retryOn": ["5xx"],
                                                "backoff": {"baseInterval": "1ms"}}}
        px = await h1t.Proxy(h1_snapshot(ups, policy(spec))).start()
        st, flags, _, took = await asyncio.to_thread(get, px.port, "/?delay=10")
        assert (st, flags) == (504, "UT")
        assert 0.6 <= took < 0.6 + LATE, took
        px.close()
        for u in ups:
            u.close()
    h1t.run(main())


def test_h1_keepalive_connection_keeps_its_timer_after_a_stream_idle_504():
    """The stream idle timeout answers 504 and the connection stays open for the next
    request: it must still be closed after ``idle_timeout`` (it used to be left with no
    timer at all, open forever)."""
    async def main():
        (up,) = await h1t.start_all("v1")
        px = await h1t.Proxy(NodeSnapshot(NODE, (h1t.service("web", VIP, [up.endpoint()]),)),
                             limits=L7Limits(stream_idle_timeout=0.3, idle_timeout=0.6)).start()
        r, w = await asyncio.open_connection(LO, px.port)
        t0 = time.monotonic()
        w.write(b"GET /?delay=30 HTTP/1.1\r\nHost: web\r\n\r\n")
        out = await asyncio.wait_for(r.read(-1), 10)  # the 504, then the proxy's close
        took = time.monotonic() - t0
        assert out.startswith(b"HTTP/1.1 504 ") and b"x-hostmesh-flags: UT" in out
        assert out.count(b"HTTP/1.1 ") == 1
        assert 0.3 + 0.6 <= took < 5, took
        w.close()
        px.close()
        up.close()
    h1t.run(main())


# ============================================================================ HTTP/2 and gRPC
def test_h2_route_timeout_and_per_try_timeout_with_retry():
    async def main():
        stuck = await h2t.ScriptedServer(hang).start()
        ok = await h2t.ScriptedServer(answer).start()
        spec = {"timeout": "5s", "retries": {"attempts": 1, "perTryTimeout": "250ms", "retryOn": ["5xx"]}}
        # round robin: the first try goes to the stuck endpoint, the retry to the other
        px = await h2t.Proxy(h2_snapshot([stuck.endpoint(), ok.endpoint()], policy(spec))).start()
        c = await h2t.H2Client.connect(px.port)
        r, took = await timed(c.get("/retry"))
        assert r.status == 200 and bytes(r.body) == b"ok"
        assert 0.25 <= took < 0.25 + LATE, took
        c.close()
        px.close()
        px = await h2t.Proxy(h2_snapshot([stuck.endpoint()], policy({"timeout": "300ms"}))).start()
        c = await h2t.H2Client.connect(px.port)
        r, took = await timed(c.get("/route"))
        assert r.status == 504 and r.headers[b"x-hostmesh-flags"] == b"UT"
        assert 0.3 <= took < 0.3 + LATE, took
        c.close()
        px.close()
        stuck.close()
        ok.close()
    h2t.run(main())


def test_h2_backend_request_timeout():
    async def main():
        stuck = await h2t.ScriptedServer(hang).start()
        rules = {"parentRefs": h2t.parent(), "rules": [{"timeouts": {"backendRequest": "300ms"},
                                                        "backendRefs": [{"name": "web", "port": 80}]}]}
        px = await h2t.Proxy(h2_snapshot([stuck.endpoint()], h2t.route("be", rules))).start()
        c = await h2t.H2Client.connect(px.port)
        r, took = await timed(c.get("/be"))
        assert r.status == 504 and r.headers[b"x-hostmesh-flags"] == b"UT"
        assert 0.3 <= took < 0.3 + LATE, took
        c.close()
        px.close()
        stuck.close()
    h2t.run(main())


@pytest.mark.parametrize("route_timeout,grpc_timeout,expected", [
    ("5s", b"300m", 0.3),  # grpc-timeout shortens the route's
    ("300ms", b"10S", 0.3),  # and never lengthens it
])
def test_grpc_timeout_shortens_the_route_timeout_never_lengthens_it(route_timeout, grpc_timeout, expected):
    async def main():
        stuck = await h2t.ScriptedServer(hang).start()
        px = await h2t.Proxy(h2_snapshot([stuck.endpoint()], policy({"timeout": route_timeout}))).start()
        c = await h2t.H2Client.connect(px.port)
        r, took = await timed(c.get(GRPC_PATH, method=b"POST", headers=grpc_headers(grpc_timeout),
                                    body=EMPTY_MESSAGE))
        assert r.status == 200 and r.headers[b"grpc-status"] == b"4"  # DEADLINE_EXCEEDED
        assert expected <= took < expected + LATE, took
        sent = dict(stuck.heads[0].headers)
        assert h2t.http2_timeout(sent[b"grpc-timeout"]) <= expected + 1e-6  # the time left went upstream
        c.close()
        px.close()
        stuck.close()
    h2t.run(main())


def test_many_streams_with_different_deadlines_on_one_connection_expire_in_order():
    async def main():
        stuck = await h2t.ScriptedServer(hang).start()
        px = await h2t.Proxy(h2_snapshot([stuck.endpoint()], policy({"timeout": "30s"}))).start()
        c = await h2t.H2Client.connect(px.port)
        loop = asyncio.get_running_loop()
        deadlines = [0.15 * (i + 1) for i in range(16)]  # 150 ms .. 2.4 s
        random.Random(7).shuffle(deadlines)
        ended: list[tuple[float, float]] = []  # (when it ended, its deadline), in the order they ended
        t0 = time.perf_counter()
        replies = []
        for d in deadlines:
            _, r = c.request(GRPC_PATH, method=b"POST", headers=grpc_headers(b"%dm" % round(d * 1000)),
                             body=EMPTY_MESSAGE)
            r.done.add_done_callback(lambda _f, d=d: ended.append((time.perf_counter() - t0, d)))
            replies.append(r)
        await asyncio.wait_for(asyncio.gather(*(r.done for r in replies)), 30)
        await asyncio.sleep(0)
        assert all(r.headers[b"grpc-status"] == b"4" for r in replies)
        assert [d for _, d in ended] == sorted(deadlines)
        for at, d in ended:
            assert d <= at < d + LATE, (d, at)
        assert loop.is_running()
        c.close()
        px.close()
        stuck.close()
    h2t.run(main())


def test_finished_streams_do_not_pile_up_in_the_deadline_heap():
    async def main():
        ok = await h2t.ScriptedServer(answer).start()
        snap = h2_snapshot([ok.endpoint()], policy({"timeout": "30s", "retries": {"attempts": 1,
                                                                                 "perTryTimeout": "20s"}}))
        px = h2t.Proxy(snap)
        drivers = []

        def serve(transport, first, ctx, inputs):
            drivers.append(serve_http2(transport, first, ctx, inputs))
            return drivers[-1]
        server = await listen(serve, px.inputs, lambda: snap, LO, 0, dst=(VIP, 80))
        c = await h2t.H2Client.connect(server.sockets[0].getsockname()[1])
        batches, width, most = 30, 100, 0
        for _ in range(batches):
            replies = [c.request("/")[1] for _ in range(width)]
            await asyncio.wait_for(asyncio.gather(*(r.done for r in replies)), 30)
            assert all(r.status == 200 for r in replies)
            most = max(most, len(drivers[0].deadlines))
        (drv,) = drivers
        assert drv.seq == 2 * batches * width  # a route and a per-try deadline per stream
        # never more than twice the live entries (2 per open stream) plus the slack
        assert most <= 2 * 2 * width + http2_proxy._COMPACT_MIN + 1, most
        c.close()
        server.close()
        px.inputs.pool.close()
        px.inputs.h2pool.close()
        ok.close()
    h2t.run(main())


# ============================================================================ no timer per request
class CountingLoop(uvloop.Loop):
    """uvloop, counting the timers the drivers ask for (their callbacks' module)."""

    DRIVERS = (http1_proxy.__name__, http2_proxy.__name__)

    def __init__(self) -> None:
        super().__init__()
        self.driver_timers = 0

    def _count(self, callback) -> None:
        if getattr(callback, "__module__", None) in self.DRIVERS:
            self.driver_timers += 1

    def call_later(self, delay, callback, *args, context=None):
        self._count(callback)
        return super().call_later(delay, callback, *args, context=context)

    def call_at(self, when, callback, *args, context=None):
        self._count(callback)
        return super().call_at(when, callback, *args, context=context)


def run_counting(main) -> int:
    """Run ``main(loop)``; the drivers' timers made during it."""
    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        loop = runner.get_loop()
        runner.run(main(loop))
        return loop.driver_timers


REQUESTS = 300


def test_h1_typical_policy_makes_no_timer_per_request():
    async def main(loop):
        ups = [await h1t.Upstream(p).start() for p in "ab"]
        px = await h1t.Proxy(h1_snapshot(ups, policy(TYPICAL))).start()
        before = loop.driver_timers
        assert await asyncio.to_thread(session, px.port, REQUESTS) == [200] * REQUESTS
        main.timers = loop.driver_timers - before
        px.close()
        for u in ups:
            u.close()
    run_counting(main)
    # the connection's tick, moved once for the first per-try deadline (3 s < the 5 s tick)
    assert main.timers <= 3, main.timers


@pytest.mark.parametrize("leg", ["h2-upstream", "h1-upstream"])
def test_h2_typical_policy_makes_no_timer_per_request(leg):
    async def main(loop):
        if leg == "h2-upstream":
            up = await h2t.ScriptedServer(answer).start()
            snap = h2_snapshot([up.endpoint()], policy(TYPICAL))
        else:
            up = await h2t.Upstream("v1").start()
            snap = h2_snapshot([up.endpoint()], policy(TYPICAL), app_protocol="")
        px = await h2t.Proxy(snap).start()
        before = loop.driver_timers
        c = await h2t.H2Client.connect(px.port)
        for _ in range(REQUESTS // 50):
            replies = [c.request("/")[1] for _ in range(50)]
            await asyncio.wait_for(asyncio.gather(*(r.done for r in replies)), 30)
            assert all(r.status == 200 for r in replies)
        main.timers = loop.driver_timers - before
        c.close()
        px.close()
        up.close()
    run_counting(main)
    assert main.timers <= 3, main.timers
