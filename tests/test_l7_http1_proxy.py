"""The HTTP/1.1 proxy driver over real loopback sockets, in-process, under uvloop.

Upstreams are the mesh test app (``meshlab.testapp``: JSON description of each request,
``/echo``, ``size=``, ``delay=``) served in the test's own loop; the proxy is
``listen_http1`` (the driver without capture: every connection is routed as if it had
been captured for the Service VIP). Clients: raw asyncio sockets for exact bytes,
``http.client`` in a thread, curl in a subprocess. No assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import io
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from meshlab.testapp.httpserver import HTTPApp
from nodeagent.proxy.l7.context import ConnContext, L7Inputs, L7Limits
from nodeagent.proxy.l7.http1_proxy import listen_http1, serve_http1
from nodeagent.proxy.l7.metrics import HttpMetrics
from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot, Service, ServicePort

pytestmark = pytest.mark.timeout(120)

LO = "127.0.0.1"
NODE = "node-1"
NS = "shop"
VIP = "198.19.0.10"  # only looked up in the snapshot, never dialed
VIP2, VIP3 = "198.19.0.11", "198.19.0.12"


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# ============================================================================ fixtures
class Upstream:
    """A test app on 127.0.0.1:0 that counts connections and requests."""

    def __init__(self, pod: str, node: str = NODE) -> None:
        self.pod = pod
        self.node = node
        self.log = io.StringIO()
        self.app = HTTPApp(pod, node, log_requests=True, log_file=self.log)
        self.accepted = 0
        self.server = None
        self.port = 0

    async def start(self) -> "Upstream":
        def factory():
            self.accepted += 1
            return self.app.protocol_factory()
        self.server = await asyncio.get_running_loop().create_server(factory, LO, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def requests(self) -> int:
        return self.log.getvalue().count("\n")

    def endpoint(self, workload: str | None = None) -> Endpoint:
        return Endpoint(LO, self.port, self.node, workload or self.pod, NS)

    def close(self) -> None:
        self.app.close_all()
        self.server.close()


def service(name: str, vip: str, endpoints, port: int = 80) -> Service:
    eps = tuple(endpoints)
    return Service(name, NS, vip, (ServicePort(port, eps[0].port if eps else 8080),), eps)


def route(name: str, spec: dict, kind: str = "HTTPRoute") -> ConfigObject:
    return ConfigObject(kind, NS, name, json.dumps(spec))


def parent(name: str = "web") -> list:
    return [{"kind": "Service", "group": "", "name": name}]


class Proxy:
    def __init__(self, snapshot: NodeSnapshot, *, limits: L7Limits | None = None, seed: int | None = 1,
                 dst=(VIP, 80), connector=None) -> None:
        self.snapshot = snapshot
        self.registry = CollectorRegistry()
        self.metrics = HttpMetrics(self.registry)
        self.inputs = L7Inputs.create(NODE, self.metrics, limits=limits, connector=connector,
                                      rand=random.Random(seed) if seed is not None else None)
        self.dst = dst
        self.done = []
        self.server = None
        self.port = 0

    async def start(self) -> "Proxy":
        self.server = await listen_http1(self.inputs, lambda: self.snapshot, LO, 0, dst=self.dst,
                                         on_done=self.done.append)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        self.server.close()
        self.inputs.pool.close()

    def count(self, code: str, flags: str = "-") -> float:
        total = 0.0
        for m in self.registry.collect():
            if m.name != "hostmesh_requests":
                continue
            for s in m.samples:
                if s.name == "hostmesh_requests_total" and s.labels["response_code"] == code \
                        and s.labels["response_flags"] == flags:
                    total += s.value
        return total


async def start_all(*pods: str):
    return [await Upstream(p).start() for p in pods]


async def raw(port: int, data: bytes, *, timeout: float = 10.0, then_close: bool = False) -> bytes:
    """Send ``data``; return everything read until the proxy closes the connection."""
    r, w = await asyncio.open_connection(LO, port)
    w.write(data)
    if then_close:
        w.write_eof()
    out = b""
    try:
        out = await asyncio.wait_for(r.read(-1), timeout)
    finally:
        w.close()
    return out


def get(port: int, path: str = "/", headers: dict | None = None, method: str = "GET", body=None):
    c = http.client.HTTPConnection(LO, port, timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def jbody(body: bytes) -> dict:
    return json.loads(body)


# ============================================================================ basics
def test_keep_alive_reuses_one_upstream_connection_and_sets_forwarding_headers():
    async def main():
        (up,) = await start_all("v1")
        snap = NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),))
        px = await Proxy(snap).start()

        def client():
            c = http.client.HTTPConnection(LO, px.port, timeout=30)
            seen = []
            for i in range(50):
                c.request("GET", f"/p{i}", headers={"Connection": "keep-alive, x-secret", "x-secret": "1",
                                                     "Keep-Alive": "timeout=5", "x-request-id": "abc-123"})
                r = c.getresponse()
                seen.append((r.status, jbody(r.read())))
            c.close()
            return seen
        seen = await asyncio.to_thread(client)
        assert [s for s, _ in seen] == [200] * 50
        assert [d["path"] for _, d in seen] == [f"/p{i}" for i in range(50)]
        h = seen[0][1]["headers"]
        assert "x-secret" not in h and "keep-alive" not in h and "connection" not in h
        assert h["x-forwarded-for"] == LO and h["x-forwarded-proto"] == "http"
        assert h["x-request-id"] == "abc-123"
        assert up.accepted == 1
        assert px.count("200") == 50
        px.close()
        up.close()
    run(main())


def test_pipelined_requests_are_answered_in_order():
    async def main():
        (up,) = await start_all("v1")
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),))).start()
        reqs = b"".join(b"GET /r%d HTTP/1.1\r\nHost: web\r\n\r\n" % i for i in range(5))
        reqs += b"GET /last HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
        out = await raw(px.port, reqs)
        paths = [json.loads(line)["path"] for line in out.split(b"\r\n\r\n")[1:] if line.startswith(b"{")
                 for line in [line.split(b"\n")[0]]]
        assert out.count(b"HTTP/1.1 200 OK") == 6
        assert paths == [f"/r{i}" for i in range(5)] + ["/last"]
        assert up.accepted == 1
        px.close()
        up.close()
    run(main())


def test_deep_pipeline_pauses_reading_and_answers_everything_in_order():
    async def main():
        (up,) = await start_all("v1")
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),))).start()
        n = 60  # far past the codec's max_pipelined (16): reading pauses, then resumes
        reqs = b"".join(b"GET /q%d HTTP/1.1\r\nHost: web\r\n\r\n" % i for i in range(n - 1))
        reqs += b"GET /q%d HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n" % (n - 1)
        out = await raw(px.port, reqs)
        bodies = [part.split(b"\n", 1)[0] for part in out.split(b"\r\n\r\n")[1:]]
        assert [json.loads(b)["path"] for b in bodies] == [f"/q{i}" for i in range(n)]
        assert up.accepted == 1
        px.close()
        up.close()
    run(main())


def test_chunked_upload_and_chunked_echo():
    async def main():
        (up,) = await start_all("v1")
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),))).start()
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (b"hello ", b"chunked ", b"world")) + b"0\r\n\r\n"
        req = b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body
        out = await raw(px.port, req)
        head, _, rest = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding: chunked" in head.lower()
        # de-chunk
        data, buf = b"", rest
        while True:
            size_line, _, buf = buf.partition(b"\r\n")
            n = int(size_line, 16)
            if n == 0:
                break
            data, buf = data + buf[:n], buf[n + 2:]
        assert data == b"hello chunked world"
        px.close()
        up.close()
    run(main())


def test_serve_http1_takes_over_a_transport_with_detected_bytes_and_reports_done_once():
    async def main():
        (up,) = await start_all("v1")
        snap = NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),))
        inputs = L7Inputs.create(NODE, HttpMetrics(CollectorRegistry()))
        done = []

        class Detect(asyncio.Protocol):  # stands in for the listener's detection phase
            def connection_made(self, transport):
                self.t = transport

            def data_received(self, data):
                ctx = ConnContext.for_connection(inputs, snap, src_ip=LO, dst_ip=VIP, dst_port=80,
                                                 reporter="source", on_done=done.append)
                self.t.pause_reading()
                serve_http1(self.t, data, ctx, inputs)

        server = await asyncio.get_running_loop().create_server(Detect, LO, 0)
        port = server.sockets[0].getsockname()[1]
        out = await raw(port, b"GET /d HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200") and b'"path":"/d"' in out
        for _ in range(100):
            if done:
                break
            await asyncio.sleep(0.01)
        assert len(done) == 1
        server.close()
        inputs.pool.close()
        up.close()
    run(main())


# ============================================================================ routing
def two_versions(v1: Upstream, v2: Upstream, rules: list) -> NodeSnapshot:
    svcs = (service("web", VIP, [v1.endpoint()]), service("web-v1", VIP2, [v1.endpoint()]),
            service("web-v2", VIP3, [v2.endpoint()]))
    return NodeSnapshot(NODE, svcs, config=(route("web", {"parentRefs": parent(), "rules": rules}),))


def test_weighted_split_90_10_over_2000_requests():
    async def main():
        v1, v2 = await start_all("v1", "v2")
        snap = two_versions(v1, v2, [{"backendRefs": [{"name": "web-v1", "port": 80, "weight": 90},
                                                       {"name": "web-v2", "port": 80, "weight": 10}]}])
        px = await Proxy(snap, seed=42).start()

        def client():
            c = http.client.HTTPConnection(LO, px.port, timeout=30)
            pods = []
            for _ in range(2000):
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                pods.append(r.getheader("x-testapp-pod"))
            c.close()
            return pods
        pods = await asyncio.to_thread(client)
        share = pods.count("v2") / len(pods) * 100
        assert pods.count("v1") + pods.count("v2") == 2000
        assert 7 <= share <= 13, share
        px.close()
        v1.close()
        v2.close()
    run(main())


def test_header_match_routes_only_matching_requests_to_v2_and_filters_apply():
    async def main():
        v1, v2 = await start_all("v1", "v2")
        rules = [
            {"matches": [{"headers": [{"name": "x-canary", "value": "yes"}]}],
             "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-via", "value": "canary"}]}},
                         {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-served", "value": "v2"}]}}],
             "backendRefs": [{"name": "web-v2", "port": 80}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
             "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}],
             "backendRefs": [{"name": "web-v1", "port": 80}]},
            {"matches": [{"path": {"type": "Exact", "value": "/moved"}}],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {"hostname": "example.org", "statusCode": 301}}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": [{"name": "web-v1", "port": 80}]},
        ]
        px = await Proxy(two_versions(v1, v2, rules)).start()
        st, h, b = await asyncio.to_thread(get, px.port, "/a", {"x-canary": "yes"})
        assert st == 200 and jbody(b)["pod"] == "v2" and jbody(b)["headers"]["x-via"] == "canary"
        assert h["x-served"] == "v2"
        for hv in ({}, {"x-canary": "no"}):
            st, h, b = await asyncio.to_thread(get, px.port, "/a", hv)
            assert jbody(b)["pod"] == "v1" and "x-served" not in h
        st, _, b = await asyncio.to_thread(get, px.port, "/old/x?q=1")
        assert jbody(b)["path"] == "/new/x" and jbody(b)["query"] == "q=1"
        st, h, _ = await asyncio.to_thread(get, px.port, "/moved")
        assert st == 301 and h["location"] == "http://example.org/moved"
        px.close()
        v1.close()
        v2.close()
    run(main())


def test_no_matching_route_is_404_nr():
    async def main():
        v1, v2 = await start_all("v1", "v2")
        rules = [{"matches": [{"path": {"type": "Exact", "value": "/only"}}], "backendRefs": [{"name": "web-v1", "port": 80}]}]
        px = await Proxy(two_versions(v1, v2, rules)).start()
        st, h, _ = await asyncio.to_thread(get, px.port, "/other")
        assert st == 404 and h["x-hostmesh-flags"] == "NR"
        px.close()
        v1.close()
        v2.close()
    run(main())


def test_mirror_gets_copies_client_sees_primary_and_a_failing_mirror_changes_nothing():
    async def main():
        v1, mirror = await start_all("v1", "mirror")
        dead = Endpoint(LO, 1, NODE, "dead", NS)  # nothing listens on port 1
        svcs = (service("web", VIP, [v1.endpoint()]), service("web-v1", VIP2, [v1.endpoint()]),
                service("shadow", VIP3, [mirror.endpoint()]), service("broken", "198.19.0.13", [dead]))
        rules = [{"matches": [{"path": {"type": "PathPrefix", "value": "/broken"}}],
                  "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "broken", "port": 80}}}],
                  "backendRefs": [{"name": "web-v1", "port": 80}]},
                 {"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 80}}}],
                  "backendRefs": [{"name": "web-v1", "port": 80}]}]
        snap = NodeSnapshot(NODE, svcs, config=(route("web", {"parentRefs": parent(), "rules": rules}),))
        px = await Proxy(snap).start()
        for i in range(20):
            st, _, b = await asyncio.to_thread(get, px.port, f"/m{i}", None, "POST", b"x" * 1000)
            assert st == 200 and jbody(b)["pod"] == "v1" and jbody(b)["body_bytes"] == 1000
        for _ in range(200):
            if mirror.requests >= 20:
                break
            await asyncio.sleep(0.01)
        assert mirror.requests == 20 and mirror.log.getvalue().count(" in=1000 ") == 20  # bodies copied too
        for i in range(10):
            st, _, b = await asyncio.to_thread(get, px.port, f"/broken/{i}")
            assert st == 200 and jbody(b)["pod"] == "v1"
        assert px.count("200") == 30
        px.close()
        v1.close()
        mirror.close()
    run(main())


# ============================================================================ load balancing
def lb_snapshot(ups, lb: dict) -> NodeSnapshot:
    svc = service("web", VIP, [u.endpoint() for u in ups])
    policy = ConfigObject("TrafficPolicy", NS, "web-lb", json.dumps(
        {"targetRef": {"kind": "Service", "name": "web"}, "loadBalancer": lb}))
    return NodeSnapshot(NODE, (svc,), config=(policy,))


def pods_for(port: int, n: int, headers_fn=lambda i: {}) -> list[str]:
    out = []
    c = http.client.HTTPConnection(LO, port, timeout=30)
    for i in range(n):
        c.request("GET", "/", headers=headers_fn(i))
        r = c.getresponse()
        r.read()
        out.append(r.getheader("x-testapp-pod"))
    c.close()
    return out


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"])
def test_lb_policies_use_every_endpoint(policy):
    async def main():
        ups = await start_all("a", "b", "c")
        px = await Proxy(lb_snapshot(ups, {"type": policy})).start()
        pods = await asyncio.to_thread(pods_for, px.port, 90)
        counts = {p: pods.count(p) for p in "abc"}
        if policy == "ROUND_ROBIN":
            assert counts == {"a": 30, "b": 30, "c": 30}
        else:
            assert all(counts[p] > 0 for p in "abc"), counts
        px.close()
        for u in ups:
            u.close()
    run(main())


@pytest.mark.parametrize("ring", [{"header": "x-user"}, {"cookie": "session"}, {"sourceIP": True}])
def test_ring_hash_is_sticky_per_key(ring):
    async def main():
        ups = await start_all("a", "b", "c")
        px = await Proxy(lb_snapshot(ups, {"type": "RING_HASH", "ringHash": ring})).start()
        key = lambda i: {"x-user": f"u{i % 10}", "cookie": f"session=s{i % 10}"}  # noqa: E731
        pods = await asyncio.to_thread(pods_for, px.port, 100, key)
        by_key: dict[int, set] = {}
        for i, p in enumerate(pods):
            by_key.setdefault(i % 10, set()).add(p)
        assert all(len(s) == 1 for s in by_key.values()), by_key
        if "sourceIP" in ring:
            assert len(set(pods)) == 1  # one client address
        else:
            assert len(set(pods)) > 1  # ten keys spread over the ring
        px.close()
        for u in ups:
            u.close()
    run(main())


def test_prefer_same_node_keeps_traffic_local():
    async def main():
        local, remote = await Upstream("local", NODE).start(), await Upstream("remote", "node-2").start()
        px = await Proxy(lb_snapshot([local, remote], {"type": "ROUND_ROBIN", "preferSameNode": True})).start()
        pods = await asyncio.to_thread(pods_for, px.port, 20)
        assert set(pods) == {"local"}
        px.close()
        local.close()
        remote.close()
    run(main())


# ============================================================================ proxy-made errors
def test_request_timeout_is_504_ut_and_backend_timeout_too():
    async def main():
        v1, v2 = await start_all("v1", "v2")
        rules = [{"matches": [{"path": {"type": "PathPrefix", "value": "/req"}}], "timeouts": {"request": "200ms"},
                  "backendRefs": [{"name": "web-v1", "port": 80}]},
                 {"timeouts": {"backendRequest": "200ms"}, "backendRefs": [{"name": "web-v1", "port": 80}]}]
        px = await Proxy(two_versions(v1, v2, rules)).start()
        for path in ("/req?delay=3", "/be?delay=3"):
            st, h, b = await asyncio.to_thread(get, px.port, path)
            assert st == 504 and h["x-hostmesh-flags"] == "UT", (path, st, b)
        st, _, _ = await asyncio.to_thread(get, px.port, "/req")
        assert st == 200
        assert px.count("504", "UT") == 2
        px.close()
        v1.close()
        v2.close()
    run(main())


def test_connect_failure_is_503_uf_and_no_endpoints_is_503_uh():
    async def main():
        dead = Endpoint(LO, 1, NODE, "dead", NS)
        snap = NodeSnapshot(NODE, (service("web", VIP, [dead]), service("empty", VIP2, [], 80)))
        px = await Proxy(snap).start()
        st, h, b = await asyncio.to_thread(get, px.port, "/")
        assert st == 503 and h["x-hostmesh-flags"] == "UF" and b.startswith(b"upstream connect")
        px2 = await Proxy(snap, dst=(VIP2, 80)).start()
        st, h, _ = await asyncio.to_thread(get, px2.port, "/")
        assert st == 503 and h["x-hostmesh-flags"] == "UH"
        assert px.count("503", "UF") == 1 and px2.count("503", "UH") == 1
        px.close()
        px2.close()
    run(main())


def test_pool_limit_queues_then_overflows_with_503_uo():
    async def main():
        (up,) = await start_all("v1")
        svc = service("web", VIP, [up.endpoint()])
        policy = ConfigObject("TrafficPolicy", NS, "web-cp", json.dumps(
            {"targetRef": {"kind": "Service", "name": "web"},
             "connectionPool": {"maxConnections": 1, "maxPendingRequests": 1}}))
        px = await Proxy(NodeSnapshot(NODE, (svc,), config=(policy,))).start()
        results = await asyncio.gather(*(asyncio.to_thread(get, px.port, "/?delay=0.5") for _ in range(3)))
        codes = sorted(st for st, _, _ in results)
        assert codes == [200, 200, 503]
        assert [h["x-hostmesh-flags"] for st, h, _ in results if st == 503] == ["UO"]
        assert up.accepted == 1  # the queued request reused the one connection
        px.close()
        up.close()
    run(main())


def test_upstream_reset_before_response_is_503_uc():
    async def main():
        (up,) = await start_all("v1")
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),))).start()
        st, h, _ = await asyncio.to_thread(get, px.port, "/?reset=1")
        assert st == 503 and h["x-hostmesh-flags"] == "UC"
        px.close()
        up.close()
    run(main())


# ============================================================================ bad input
BAD = {
    "cl_and_te": (b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "differing_cl": (b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    "bad_chunk": (b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    "cr_in_value": (b"GET / HTTP/1.1\r\nHost: web\r\nX-A: a\rb\r\n\r\n", 400),
    "nul_in_value": (b"GET / HTTP/1.1\r\nHost: web\r\nX-A: a\x00b\r\n\r\n", 400),
    "lf_in_name": (b"GET / HTTP/1.1\r\nHost: web\r\nX\nA: a\r\n\r\n", 400),
    "too_many_headers": (b"GET / HTTP/1.1\r\nHost: web\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
    "headers_too_large": (b"GET / HTTP/1.1\r\nHost: web\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(8)) + b"\r\n", 431),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gets_an_error_response_and_close(case):
    data, status = BAD[case]

    async def main():
        (up,) = await start_all("v1")
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),))).start()
        out = await raw(px.port, data)  # returns only when the proxy closed the connection
        assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
        assert b"x-hostmesh-flags: DPE" in out and b"connection: close" in out
        assert up.requests == 0
        assert px.count(str(status), "DPE") == 1
        px.close()
        up.close()
    run(main())


def test_h2c_upgrade_is_stripped_and_never_101():
    async def main():
        (up,) = await start_all("v1")
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),))).start()
        out = await raw(px.port, b"GET /u HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings, close\r\n"
                                 b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ")
        doc = json.loads(out.split(b"\r\n\r\n", 1)[1])
        assert "upgrade" not in doc["headers"] and "http2-settings" not in doc["headers"]
        px.close()
        up.close()
    run(main())


def test_slowloris_header_timeout_is_408_and_idle_keepalive_closes_silently():
    async def main():
        (up,) = await start_all("v1")
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),)),
                         limits=L7Limits(header_timeout=0.3, idle_timeout=0.3)).start()
        r, w = await asyncio.open_connection(LO, px.port)
        w.write(b"GET / HTTP/1.1\r\nHost: web\r\nX-Slow: ")
        for _ in range(3):
            await asyncio.sleep(0.1)
            w.write(b"a")
        out = await asyncio.wait_for(r.read(-1), 10)
        assert out.startswith(b"HTTP/1.1 408 ") and b"x-hostmesh-flags: SI" in out
        w.close()
        # keep-alive idle: the request is answered, then the connection closes without a reply
        out = await raw(px.port, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        assert out.count(b"HTTP/1.1 ") == 1 and out.startswith(b"HTTP/1.1 200 ")
        px.close()
        up.close()
    run(main())


# ============================================================================ websocket
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WsEcho(asyncio.Protocol):
    """A minimal WebSocket server: the handshake, then text/binary frames echoed (unmasked)."""

    def connection_made(self, transport):
        self.t = transport
        self.buf = b""
        self.open = False

    def data_received(self, data):
        self.buf += data
        if not self.open:
            if b"\r\n\r\n" not in self.buf:
                return
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            key = [ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n") if ln.lower().startswith(b"sec-websocket-key:")][0]
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.open = True
        while len(self.buf) >= 6:
            n = self.buf[1] & 0x7F
            if n >= 126 or len(self.buf) < 6 + n:
                return
            mask, payload = self.buf[2:6], self.buf[6:6 + n]
            self.buf = self.buf[6 + n:]
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            self.t.write(bytes([0x81, len(data)]) + data)


def test_websocket_echo_through_the_proxy():
    async def main():
        loop = asyncio.get_running_loop()
        ws = await loop.create_server(WsEcho, LO, 0)
        port = ws.sockets[0].getsockname()[1]
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [Endpoint(LO, port, NODE, "ws", NS)]),))).start()
        r, w = await asyncio.open_connection(LO, px.port)
        key = base64.b64encode(os.urandom(16))
        w.write(b"GET /chat HTTP/1.1\r\nHost: web\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert base64.b64encode(hashlib.sha1(key + WS_GUID).digest()) in head
        for msg in (b"hello", b"through the mesh"):
            mask = os.urandom(4)
            w.write(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
            frame = await asyncio.wait_for(r.readexactly(2 + len(msg)), 10)
            assert frame == bytes([0x81, len(msg)]) + msg
        w.close()
        px.close()
        ws.close()
    run(main())


# ============================================================================ streaming, memory
PROXY_SCRIPT = textwrap.dedent("""
    import asyncio, sys, uvloop
    from prometheus_client import CollectorRegistry
    from nodeagent.proxy.l7.context import L7Inputs
    from nodeagent.proxy.l7.http1_proxy import listen_http1
    from nodeagent.proxy.l7.metrics import HttpMetrics
    from nodeagent.state import Endpoint, NodeSnapshot, Service, ServicePort

    async def main():  # argv: the upstream's port [, the Service port's appProtocol]
        port, app_protocol = int(sys.argv[1]), (sys.argv[2:] or [""])[0]
        svc = Service("web", "shop", "198.19.0.10", (ServicePort(80, port, app_protocol=app_protocol),),
                      (Endpoint("127.0.0.1", port),))
        snap = NodeSnapshot("node-1", (svc,))
        inputs = L7Inputs.create("node-1", HttpMetrics(CollectorRegistry()))
        srv = await listen_http1(inputs, lambda: snap, "127.0.0.1", 0, dst=("198.19.0.10", 80))
        print(srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()
    uvloop.run(main())
""")


def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_100_mib_upload_and_download_stream_with_bounded_memory(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    app = subprocess.Popen([sys.executable, "-m", "meshlab.testapp", "--pod", "big", "--node", NODE, "--bind", LO,
                            "--http-port", "0", "--grpc-port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    proxy = None
    try:
        line = app.stderr.readline()
        port = int(line.split("http=")[1].split()[0].rsplit(":", 1)[1])
        proxy = subprocess.Popen([sys.executable, "-c", PROXY_SCRIPT, str(port)], stdout=subprocess.PIPE, text=True, env=env)
        pport = int(proxy.stdout.readline())
        base = f"http://{LO}:{pport}"
        # warm up (imports, first connection), then take the baseline
        subprocess.run(["curl", "-sS", "-o", "/dev/null", f"{base}/?size=1M"], check=True, timeout=60)
        before = _rss_kib(proxy.pid, "VmRSS")
        down = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                               f"{base}/?size=100M"], check=True, capture_output=True, text=True, timeout=120)
        assert down.stdout == f"200 {100 * 1024 * 1024}"
        up = subprocess.run(f"head -c {100 * 1024 * 1024} /dev/zero | curl -sS -o /dev/null -w '%{{http_code}} "
                            f"%{{size_download}}' -H 'Transfer-Encoding: chunked' --data-binary @- {base}/echo",
                            shell=True, check=True, capture_output=True, text=True, timeout=120)
        assert up.stdout == f"200 {100 * 1024 * 1024}"
        peak = _rss_kib(proxy.pid, "VmHWM")
        assert peak - before < 8 * 1024, (before, peak)
    finally:
        for p in (proxy, app):
            if p is not None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


# ============================================================================ framing edge cases
class OneShot(asyncio.Protocol):
    """An upstream that answers each connection's first request with ``reply`` and then, if
    ``close``, closes (a close-delimited or HTTP/1.0 server); counts connections."""

    accepted = 0

    def __init__(self, reply: bytes, close: bool) -> None:
        self.reply = reply
        self.close = close
        OneShot.accepted += 1

    def connection_made(self, transport):
        self.t = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.t.write(self.reply)
            if self.close:
                self.t.close()
                return


def test_close_delimited_response_is_relayed_chunked_and_its_connection_not_reused():
    async def main():
        OneShot.accepted = 0
        reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nbody until close"
        server = await asyncio.get_running_loop().create_server(lambda: OneShot(reply, True), LO, 0)
        port = server.sockets[0].getsockname()[1]
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [Endpoint(LO, port, NODE, "old", NS)]),))).start()
        out = await raw(px.port, b"GET /1 HTTP/1.1\r\nHost: web\r\n\r\nGET /2 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        assert out.count(b"HTTP/1.1 200 OK") == 2
        assert out.count(b"transfer-encoding: chunked") == 2 and out.count(b"body until close") == 2
        assert OneShot.accepted == 2  # never reused after a close-delimited body
        px.close()
        server.close()
    run(main())


def test_head_request_keeps_content_length_without_body():
    async def main():
        (up,) = await start_all("v1")
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),))).start()
        out = await raw(px.port, b"HEAD /h HTTP/1.1\r\nHost: web\r\n\r\nGET /g HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        head, _, rest = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: " in head
        assert rest.startswith(b"HTTP/1.1 200")  # the HEAD response had no body
        assert up.accepted == 1
        px.close()
        up.close()
    run(main())


def test_upstream_reset_mid_response_resets_the_client():
    async def main():
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial"

        class Reset(OneShot):
            def data_received(self, data):
                self.t.write(self.reply)
                self.t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.t.abort()
        server = await asyncio.get_running_loop().create_server(lambda: Reset(reply, True), LO, 0)
        port = server.sockets[0].getsockname()[1]
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [Endpoint(LO, port, NODE, "r", NS)]),))).start()
        r, w = await asyncio.open_connection(LO, px.port)
        w.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        got = b""
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            got = await asyncio.wait_for(r.readuntil(b"partial"), 10)
            await asyncio.wait_for(r.readexactly(1000), 10)  # never completes: the body was cut
        assert got == b"" or got.endswith(b"partial")
        w.close()
        px.close()
        server.close()
    run(main())


def test_drain_closes_idle_connections_and_finishes_in_flight_ones_with_connection_close():
    async def main():
        (up,) = await start_all("v1")
        snap = NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),))
        inputs = L7Inputs.create(NODE, HttpMetrics(CollectorRegistry()))
        drivers, done = [], []

        class Accept(asyncio.Protocol):
            def connection_made(self, transport):
                ctx = ConnContext.for_connection(inputs, snap, src_ip=LO, dst_ip=VIP, dst_port=80,
                                                 reporter="source", on_done=done.append)
                drivers.append(serve_http1(transport, b"", ctx, inputs))

        server = await asyncio.get_running_loop().create_server(Accept, LO, 0)
        port = server.sockets[0].getsockname()[1]
        r1, w1 = await asyncio.open_connection(LO, port)  # idle after one exchange
        w1.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        head = await r1.readuntil(b"\r\n\r\n")
        await r1.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        r2, w2 = await asyncio.open_connection(LO, port)  # in flight during the drain
        w2.write(b"GET /?delay=0.3 HTTP/1.1\r\nHost: web\r\n\r\n")
        for _ in range(100):
            if len(drivers) == 2 and drivers[1].ex is not None:
                break
            await asyncio.sleep(0.01)
        for d in drivers:
            d.drain()
        assert await asyncio.wait_for(r1.read(-1), 10) == b""  # closed without a reply
        out2 = await asyncio.wait_for(r2.read(-1), 10)
        assert out2.startswith(b"HTTP/1.1 200") and b"connection: close" in out2
        w1.close()  # the clients close on EOF; the proxy's lingering close then ends at once
        w2.close()
        for _ in range(100):
            if len(done) == 2:
                break
            await asyncio.sleep(0.01)
        assert sorted(map(id, done)) == sorted(map(id, drivers))
        server.close()
        inputs.pool.close()
        up.close()
    run(main())


# ============================================================================ pool and connector
def test_dials_go_through_the_injected_connector_and_timeouts_map_to_503_uf():
    async def main():
        from nodeagent.proxy.l7.pool import tcp_connector
        (up,) = await start_all("v1")
        calls = []

        async def connector(endpoint, dial, factory):
            calls.append((endpoint.address, endpoint.port, dial.service, dial.conn.src_ip, dial.connect_timeout))
            if endpoint.port == 1:
                raise TimeoutError("no answer")
            return await tcp_connector(endpoint, dial, factory)

        snap = NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),
                                   service("slow", VIP2, [Endpoint(LO, 1, NODE, "slow", NS)])))
        px = await Proxy(snap, connector=connector, limits=L7Limits(connect_timeout=0.5)).start()
        st, _, _ = await asyncio.to_thread(get, px.port, "/")
        assert st == 200
        assert calls == [(LO, up.port, "web.shop.svc.cluster.local", LO, 0.5)]
        px2 = await Proxy(snap, connector=connector, dst=(VIP2, 80)).start()
        st, h, b = await asyncio.to_thread(get, px2.port, "/")
        assert st == 503 and h["x-hostmesh-flags"] == "UF" and b"connect timeout" in b
        px.close()
        px2.close()
        up.close()
    run(main())


def test_idle_pooled_connections_are_closed_after_the_pool_idle_timeout():
    async def main():
        (up,) = await start_all("v1")
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),)),
                         limits=L7Limits(pool_idle_timeout=0.2)).start()
        st, _, _ = await asyncio.to_thread(get, px.port, "/")
        assert st == 200 and px.inputs.pool.stats()[f"{LO}:{up.port}"]["idle"] == 1
        for _ in range(200):
            if not px.inputs.pool.stats():
                break
            await asyncio.sleep(0.01)
        assert px.inputs.pool.stats() == {}
        st, _, _ = await asyncio.to_thread(get, px.port, "/")
        assert st == 200 and up.accepted == 2
        px.close()
        up.close()
    run(main())


def test_stream_idle_timeout_ends_stalled_uploads_408_and_silent_upstreams_504():
    async def main():
        (up,) = await start_all("v1")
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),)),
                         limits=L7Limits(stream_idle_timeout=0.3)).start()
        r, w = await asyncio.open_connection(LO, px.port)
        w.write(b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 100\r\n\r\n0123456789")  # then stalls
        out = await asyncio.wait_for(r.read(-1), 10)
        assert out.startswith(b"HTTP/1.1 408 ") and b"x-hostmesh-flags: SI" in out
        w.close()
        st, h, _ = await asyncio.to_thread(get, px.port, "/?delay=3")
        assert st == 504 and h["x-hostmesh-flags"] == "UT"
        st, _, _ = await asyncio.to_thread(get, px.port, "/?delay=0.1")
        assert st == 200
        px.close()
        up.close()
    run(main())


# ============================================================================ limits, metrics
@pytest.mark.parametrize("field,value", [("header_timeout", 0), ("idle_timeout", -1), ("connect_timeout", -2),
                                         ("max_pending_per_endpoint", 0), ("write_buffer_high", 0)])
def test_limits_reject_unsafe_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"L7Limits.{field}"):
        L7Limits(**{field: value})


def test_request_metrics_expose_counts_durations_and_body_sizes():
    from prometheus_client import generate_latest
    async def main():
        (up,) = await start_all("v1")
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),))).start()
        st, _, _ = await asyncio.to_thread(get, px.port, "/echo", None, "POST", b"x" * 5000)
        assert st == 200
        text = generate_latest(px.registry).decode()
        want = {"connection_security_policy": "none", "destination_service": "web.shop.svc.cluster.local",
                "destination_service_name": "web", "destination_service_namespace": "shop",
                "destination_workload": "v1", "destination_workload_namespace": "shop",
                "destination_canonical_service": "v1", "destination_canonical_revision": "latest",
                "destination_principal": "unknown", "reporter": "source", "request_protocol": "http",
                "response_code": "200", "grpc_response_status": "", "response_flags": "-",
                "source_workload": "unknown", "source_workload_namespace": "unknown", "source_principal": "unknown"}
        (sample,) = [s for fam in px.registry.collect() if fam.name == "hostmesh_requests"
                     for s in fam.samples]
        assert {k: sample.labels[k] for k in want} == want and sample.value == 1.0
        assert "hostmesh_request_duration_seconds_count{" in text
        assert any(line.startswith("hostmesh_request_bytes_sum{") and line.endswith(" 5000.0") for line in text.splitlines())
        assert any(line.startswith("hostmesh_response_bytes_sum{") and line.endswith(" 5000.0") for line in text.splitlines())
        px.close()
        up.close()
    run(main())


def test_response_heads_skip_prepare_response_only_when_the_serializer_writes_the_same():
    """The driver skips ``prepare_response`` for a final head unless ``_needs_stripping``: then
    the HTTP/1 serializer alone must write exactly what it writes after ``prepare_response``."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from nodeagent.proxy.l7.headers import prepare_response
    from nodeagent.proxy.l7.http1 import ResponseHead, ServerConnection
    from nodeagent.proxy.l7.http1_proxy import _needs_stripping

    names = st.sampled_from([b"x-a", b"connection", b"keep-alive", b"te", b"upgrade", b"transfer-encoding",
                             b"proxy-connection", b"http2-settings", b"content-type", b"server"])
    values = st.sampled_from([b"keep-alive", b"close", b"Keep-Alive", b"x-a", b"trailers", b"v", b"upgrade"])

    def head_bytes(headers) -> bytes:
        server = ServerConnection()
        server.receive_data(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        return server.send_response(ResponseHead(200, headers, content_length=0))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(names, values), max_size=6))
    def check(fields):
        if not _needs_stripping(fields):
            assert head_bytes(list(fields)) == head_bytes(prepare_response(fields))

    check()
    assert _needs_stripping([(b"connection", b"x-a")]) and _needs_stripping([(b"te", b"trailers")])
    assert not _needs_stripping([(b"connection", b"keep-alive"), (b"keep-alive", b"timeout=5")])
