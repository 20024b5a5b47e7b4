"""The HTTP/2 + gRPC proxy driver over real loopback sockets, in-process, under uvloop.

The proxy is ``listen_http2`` (the driver without capture: every connection is routed as
if captured for the Service VIP). Upstreams: the mesh test app's HTTP server in the
test's loop (HTTP/2 client -> HTTP/1.1 upstream), the test app as a subprocess for gRPC
(grpcio server), and a scripted HTTP/2 server built on ``http2.ServerConnection`` where a
test needs to see or steer frames (resets, GOAWAY, stalls). Clients: curl, nghttp, h2load,
grpcio (in a thread) and a small HTTP/2 client on ``http2.ClientConnection``. No
assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import threading

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from meshlab.testapp.httpserver import HTTPApp
from nodeagent.proxy.l7 import http2
from nodeagent.proxy.l7.context import ConnContext, L7Inputs, L7Limits
from nodeagent.proxy.l7.http2 import H2_PREFACE, REFUSED_STREAM, ClientConnection, Http2Limits, ServerConnection
from nodeagent.proxy.l7.http2_proxy import listen_http2, serve_http2
from nodeagent.proxy.l7.metrics import HttpMetrics
from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot, Service, ServicePort
from tests.test_l7_http1_proxy import _rss_kib

pytestmark = pytest.mark.timeout(120)

LO = "127.0.0.1"
NODE = "node-1"
NS = "shop"
VIP, VIP2, VIP3 = "198.19.0.10", "198.19.0.11", "198.19.0.12"  # only looked up in snapshots


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def needs(tool: str):
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"needs {tool}")


# ============================================================================ fixtures
class Upstream:
    """The test app's HTTP/1.1 server on 127.0.0.1:0 (counts requests)."""

    def __init__(self, pod: str) -> None:
        self.pod = pod
        self.log = io.StringIO()
        self.app = HTTPApp(pod, NODE, log_requests=True, log_file=self.log)

    async def start(self) -> "Upstream":
        self.server = await asyncio.get_running_loop().create_server(self.app.protocol_factory, LO, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def endpoint(self) -> Endpoint:
        return Endpoint(LO, self.port, NODE, self.pod, NS)

    def close(self) -> None:
        self.app.close_all()
        self.server.close()


def service(name: str, vip: str, endpoints, app_protocol: str = "", port: int = 80) -> Service:
    eps = tuple(endpoints)
    return Service(name, NS, vip, (ServicePort(port, eps[0].port if eps else 8080, app_protocol=app_protocol),), eps)


def route(name: str, spec: dict, kind: str = "HTTPRoute") -> ConfigObject:
    return ConfigObject(kind, NS, name, json.dumps(spec))


def parent(name: str = "web", port: int | None = None) -> list:
    p = {"kind": "Service", "group": "", "name": name}
    if port is not None:
        p["port"] = port
    return [p]


class Proxy:
    def __init__(self, snapshot: NodeSnapshot, *, limits: L7Limits | None = None, h2limits=http2.DEFAULT_LIMITS,
                 seed: int = 1, dst=(VIP, 80), connector=None, partition=None) -> None:
        self.snapshot = snapshot
        self.registry = CollectorRegistry()
        self.inputs = L7Inputs.create(NODE, HttpMetrics(self.registry), limits=limits, rand=random.Random(seed),
                                      connector=connector, partition=partition)
        self.h2limits = h2limits
        self.dst = dst
        self.done: list = []

    async def start(self) -> "Proxy":
        self.server = await listen_http2(self.inputs, lambda: self.snapshot, LO, 0, dst=self.dst,
                                         on_done=self.done.append, limits=self.h2limits)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        self.server.close()
        self.inputs.pool.close()
        self.inputs.h2pool.close()

    def count(self, code: str, flags: str = "-", protocol: str | None = None) -> float:
        total = 0.0
        for m in self.registry.collect():
            for s in m.samples:
                if s.name == "hostmesh_requests_total" and s.labels["response_code"] == code \
                        and s.labels["response_flags"] == flags \
                        and (protocol is None or s.labels["request_protocol"] == protocol):
                    total += s.value
        return total


class Reply:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.trailers: dict[bytes, bytes] = {}
        self.reset: int | None = None
        self.done = asyncio.get_running_loop().create_future()


class H2Client(asyncio.Protocol):
    """A minimal HTTP/2 client on ``http2.ClientConnection`` (reads everything it is sent)."""

    def __init__(self) -> None:
        self.codec = ClientConnection()
        self.replies: dict[int, Reply] = {}
        self.goaway: http2.ConnectionTerminated | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.raw = bytearray()  # every byte received (tests parse the frames)

    @classmethod
    async def connect(cls, port: int) -> "H2Client":
        _, c = await asyncio.get_running_loop().create_connection(cls, LO, port)
        return c

    def connection_made(self, transport) -> None:
        self.t = transport
        transport.write(self.codec.data_to_send())

    def data_received(self, data: bytes) -> None:
        self.raw += data
        for ev in self.codec.receive_data(data):
            r = self.replies.get(getattr(ev, "stream_id", 0))
            if type(ev) is http2.ResponseHead and r is not None and not ev.informational:
                r.status, r.headers = ev.status, dict(ev.headers)
            elif type(ev) is http2.Data and r is not None:
                r.body += ev.data
                self.t.write(self.codec.consumed(ev.stream_id, len(ev.data)))
            elif type(ev) is http2.EndOfMessage and r is not None:
                r.trailers = dict(ev.trailers)
                r.done.done() or r.done.set_result(r)
            elif type(ev) is http2.StreamReset and r is not None:
                r.reset = ev.error_code
                r.done.done() or r.done.set_result(r)
            elif type(ev) is http2.ConnectionTerminated:
                self.goaway = ev
        self.t.write(self.codec.data_to_send())

    def connection_lost(self, exc) -> None:
        self.closed.done() or self.closed.set_result(exc)
        for r in self.replies.values():
            r.done.done() or r.done.set_result(r)

    def request(self, path: str, *, method: bytes = b"GET", headers=(), body: bytes | None = None,
                end: bool = True) -> tuple[int, Reply]:
        head = http2.RequestHead(0, method, b"http", b"web", path.encode(), list(headers), body is None and end)
        sid = self.codec.send_request(head)
        r = self.replies[sid] = Reply()
        out = [self.codec.data_to_send()]  # every codec call returns (and drains) the pending bytes
        if body is not None:
            out.append(self.codec.send_data(sid, body))
            if end:
                out.append(self.codec.send_end(sid))
        self.t.write(b"".join(out))
        return sid, r

    async def get(self, path: str, **kw) -> Reply:
        _, r = self.request(path, **kw)
        return await asyncio.wait_for(r.done, 30)

    def close(self) -> None:
        self.t.close()


class ScriptedH2(asyncio.Protocol):
    """An HTTP/2 upstream on ``http2.ServerConnection``; ``on_request(self, head)`` decides.

    Records every request head and every stream the proxy reset (``self.resets``)."""

    def __init__(self, owner: "ScriptedServer") -> None:
        self.owner = owner
        self.codec = ServerConnection()
        self.received = 0
        owner.conns.append(self)

    def connection_made(self, transport) -> None:
        self.t = transport
        transport.write(self.codec.data_to_send())

    def data_received(self, data: bytes) -> None:
        self.owner.raw += data
        for ev in self.codec.receive_data(data):
            if type(ev) is http2.RequestHead:
                self.owner.heads.append(ev)
                self.owner.on_request(self, ev)
            elif type(ev) is http2.Data:
                self.owner.received += len(ev.data)
                self.received += len(ev.data)
                self.write(self.codec.consumed(ev.stream_id, len(ev.data)))
            elif type(ev) is http2.StreamReset:
                self.owner.resets.append((ev.stream_id, ev.error_code))
        self.write(self.codec.data_to_send())

    def write(self, out: bytes) -> None:
        if out and not self.t.is_closing():
            self.t.write(out)

    def answer(self, sid: int, body: bytes = b"ok", headers=(), trailers=()) -> None:
        self.write(self.codec.send_response(sid, 200, [(b"content-length", b"%d" % len(body))] + list(headers)
                                            if not trailers else list(headers)))
        self.write(self.codec.send_data(sid, body))
        self.write(self.codec.send_end(sid, list(trailers)))


class ScriptedServer:
    def __init__(self, on_request) -> None:
        self.on_request = on_request
        self.conns: list[ScriptedH2] = []
        self.heads: list[http2.RequestHead] = []
        self.resets: list[tuple[int, int]] = []
        self.received = 0
        self.raw = bytearray()  # every byte received, from every connection

    async def start(self) -> "ScriptedServer":
        self.server = await asyncio.get_running_loop().create_server(lambda: ScriptedH2(self), LO, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def endpoint(self) -> Endpoint:
        return Endpoint(LO, self.port, NODE, "h2app", NS)

    def close(self) -> None:
        for c in self.conns:
            c.t.abort()
        self.server.close()


async def eventually(pred, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    assert pred()


async def sh(*argv: str, stdin: bytes | None = None, timeout: float = 90) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.PIPE if stdin is not None else None,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(stdin), timeout)
    return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# ============================================================================ real clients, HTTP/1.1 upstream
@needs("curl")
def test_curl_get_and_multi_mib_post_both_ways_over_an_http1_upstream():
    async def main():
        up = await Upstream("v1").start()
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),))).start()
        base = f"http://{LO}:{px.port}"
        rc, out, err = await sh("curl", "-sS", "--http2-prior-knowledge", "-w", "\n%{http_version} %{http_code}",
                                f"{base}/hello?x=1", "-H", "x-request-id: rid-1")
        body, meta = out.rsplit("\n", 1)
        assert rc == 0 and meta == "2 200", err
        d = json.loads(body)
        assert d["protocol"] == "HTTP/1.1" and d["path"] == "/hello" and d["query"] == "x=1"
        assert d["headers"]["x-forwarded-for"] == LO and d["headers"]["x-request-id"] == "rid-1"
        payload = os.urandom(5 * 1024 * 1024 + 123)
        rc, out, err = await sh("sh", "-c", f"curl -sS --http2-prior-knowledge --data-binary @- {base}/echo "
                                "| sha256sum", stdin=payload)
        assert rc == 0 and out.split()[0] == hashlib.sha256(payload).hexdigest(), err
        rc, out, err = await sh("curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w",
                                "%{http_code} %{size_download}", f"{base}/?size=4M")
        assert out == f"200 {4 * 1024 * 1024}", err
        assert px.count("200", protocol="http2") == 3
        px.close()
        up.close()
    run(main())


@needs("h2load")
def test_h2load_2000_requests_100_streams_per_connection_all_succeed():
    async def main():
        up = await Upstream("v1").start()
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),))).start()
        rc, out, err = await sh("h2load", "-n", "2000", "-c", "4", "-m", "100", f"http://{LO}:{px.port}/")
        assert rc == 0, err
        assert "2000 succeeded, 0 failed, 0 errored" in out, out
        assert "status codes: 2000 2xx" in out, out
        px.close()
        up.close()
    run(main())


@needs("nghttp")
def test_nghttp_gets_a_response_and_the_scripted_h2_upstream_its_trailers():
    async def main():
        def on_request(conn, head):
            conn.answer(head.stream_id, b"from h2", headers=[(b"content-type", b"text/plain")],
                        trailers=[(b"x-checksum", b"abc")])
        s = await ScriptedServer(on_request).start()
        snap = NodeSnapshot(NODE, (service("web", VIP, [s.endpoint()], app_protocol="http2"),))
        px = await Proxy(snap).start()
        rc, out, err = await sh("nghttp", "-v", f"http://{LO}:{px.port}/t")
        assert rc == 0, err
        assert ":status: 200" in out and "from h2" in out and "x-checksum: abc" in out, out
        assert s.heads[0].path == b"/t" and (b"x-forwarded-for", LO.encode()) in s.heads[0].headers
        px.close()
        s.close()
    run(main())


def data_frames(raw: bytes) -> list:
    """The DATA frames in ``raw`` (the client preface, if any, skipped)."""
    from hyperframe.frame import DataFrame, Frame
    data = bytes(raw)
    if data.startswith(H2_PREFACE):
        data = data[len(H2_PREFACE):]
    out = []
    while len(data) >= 9:
        f, length = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9:9 + length]))
        if isinstance(f, DataFrame):
            out.append(f)
        data = data[9 + length:]
    return out


def test_a_last_data_frame_with_end_stream_is_forwarded_as_one_frame_both_ways():
    async def main():
        def on_request(conn, head):
            sid = head.stream_id
            conn.write(conn.codec.send_response(sid, 200, [(b"content-length", b"4")]))
            conn.write(conn.codec.send_data(sid, b"pong", end_stream=True))
        s = await ScriptedServer(on_request).start()
        snap = NodeSnapshot(NODE, (service("web", VIP, [s.endpoint()], app_protocol="http2"),))
        px = await Proxy(snap).start()
        c = await H2Client.connect(px.port)
        # first while the upstream connection is dialed (the body waits), then over it
        for n in (1, 2):
            s.raw.clear()
            c.raw.clear()
            sid, r = c.request("/p", method=b"POST", body=None, end=False)
            c.t.write(c.codec.send_data(sid, b"ping", end_stream=True))
            await asyncio.wait_for(r.done, 30)
            assert r.status == 200 and bytes(r.body) == b"pong" and r.reset is None
            await eventually(lambda: s.received == 4 * n)
            up = data_frames(s.raw)
            assert [(f.data, "END_STREAM" in f.flags) for f in up] == [(b"ping", True)]
            down = data_frames(c.raw)
            assert [(f.data, "END_STREAM" in f.flags) for f in down] == [(b"pong", True)]
            await eventually(lambda: px.count("200") == n)
        assert len(s.conns) == 1
        c.close()
        px.close()
        s.close()
    run(main())


# ============================================================================ routing (shared with HTTP/1.1)
def two_versions(v1, v2, rules: list) -> NodeSnapshot:
    svcs = (service("web", VIP, [v1.endpoint()]), service("web-v1", VIP2, [v1.endpoint()]),
            service("web-v2", VIP3, [v2.endpoint()]))
    return NodeSnapshot(NODE, svcs, config=(route("web", {"parentRefs": parent(), "rules": rules}),))


def test_weighted_split_and_header_routing_over_http2():
    async def main():
        v1, v2 = await Upstream("v1").start(), await Upstream("v2").start()
        snap = two_versions(v1, v2, [
            {"matches": [{"headers": [{"name": "x-canary", "value": "yes"}]}],
             "backendRefs": [{"name": "web-v2", "port": 80}]},
            {"backendRefs": [{"name": "web-v1", "port": 80, "weight": 90}, {"name": "web-v2", "port": 80, "weight": 10}]},
        ])
        px = await Proxy(snap, seed=7).start()
        c = await H2Client.connect(px.port)
        pods = []
        for batch in range(20):  # 2000 requests, 100 streams at a time on one connection
            replies = await asyncio.gather(*(c.get(f"/r{batch}-{i}") for i in range(100)))
            pods += [json.loads(r.body)["pod"] for r in replies]
        share = pods.count("v2") / len(pods)
        assert 0.07 <= share <= 0.13, share
        canary = await asyncio.gather(*(c.get("/c", headers=[(b"x-canary", b"yes")]) for _ in range(50)))
        assert {json.loads(r.body)["pod"] for r in canary} == {"v2"}
        c.close()
        px.close()
        v1.close()
        v2.close()
    run(main())


def test_no_route_is_404_nr_and_no_endpoints_503_uh():
    async def main():
        v1 = await Upstream("v1").start()
        snap = NodeSnapshot(NODE, (service("web", VIP, [v1.endpoint()]), service("empty", VIP2, [])),
                            config=(route("web", {"parentRefs": parent(), "rules": [
                                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}]}]}),))
        px = await Proxy(snap).start()
        c = await H2Client.connect(px.port)
        r = await c.get("/other")
        assert r.status == 404 and r.headers[b"x-hostmesh-flags"] == b"NR"
        px.snapshot = NodeSnapshot(NODE, (service("web", VIP, []),))
        c2 = await H2Client.connect(px.port)
        r = await c2.get("/x")
        assert r.status == 503 and r.headers[b"x-hostmesh-flags"] == b"UH"
        c.close()
        c2.close()
        px.close()
        v1.close()
    run(main())


# ============================================================================ HTTP/2 upstream behaviour
def test_slow_upstream_stream_does_not_block_a_fast_one_on_the_same_connection():
    async def main():
        slow = []

        def on_request(conn, head):
            if head.path == b"/slow":
                slow.append((conn, head.stream_id))
            else:
                conn.answer(head.stream_id, b"fast")
        s = await ScriptedServer(on_request).start()
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [s.endpoint()], app_protocol="h2c"),))).start()
        c = await H2Client.connect(px.port)
        _, slow_reply = c.request("/slow")
        fast = await asyncio.gather(*(c.get(f"/fast{i}") for i in range(20)))
        assert [bytes(r.body) for r in fast] == [b"fast"] * 20
        assert not slow_reply.done.done()
        await eventually(lambda: slow)
        conn, sid = slow[0]
        conn.answer(sid, b"finally")
        r = await asyncio.wait_for(slow_reply.done, 10)
        assert r.status == 200 and bytes(r.body) == b"finally"
        assert len(s.conns) == 1  # all 21 streams multiplexed on one upstream connection
        c.close()
        px.close()
        s.close()
    run(main())


def _goaway(last_stream_id: int, code: int = 0) -> bytes:
    return struct.pack(">I", 8)[1:] + bytes([0x7, 0]) + struct.pack(">III", 0, last_stream_id, code)


def test_upstream_goaway_and_refused_streams_are_retried_once_on_another_connection():
    async def main():
        seen = {"n": 0}

        def on_request(conn, head):
            seen["n"] += 1
            if head.path == b"/goaway" and len(s.conns) == 1:
                conn.t.write(_goaway(0))  # never processed: the proxy may retry it
                conn.t.close()
            elif head.path == b"/refused" and len(s.conns) == 2 and not s.resets:
                conn.write(conn.codec.reset(head.stream_id, REFUSED_STREAM))
            elif head.path == b"/always-refused":
                conn.write(conn.codec.reset(head.stream_id, REFUSED_STREAM))
            else:
                conn.answer(head.stream_id, b"served by conn %d" % s.conns.index(conn))
        s = await ScriptedServer(on_request).start()
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [s.endpoint()], app_protocol="http2"),))).start()
        c = await H2Client.connect(px.port)
        r = await c.get("/goaway", method=b"POST", body=b"payload")
        assert r.status == 200 and bytes(r.body) == b"served by conn 1"
        assert s.conns[1].received == len(b"payload")  # the body was replayed on the new connection
        r = await c.get("/refused")
        assert r.status == 200 and bytes(r.body) == b"served by conn 2"  # retried on a new connection
        r = await c.get("/always-refused")  # retried once, then the client is told
        assert r.status == 503 and r.headers[b"x-hostmesh-flags"] == b"UC"
        c.close()
        px.close()
        s.close()
    run(main())


def test_grpc_timeout_is_enforced_upstream_stream_reset_and_remaining_time_forwarded():
    async def main():
        s = await ScriptedServer(lambda conn, head: None).start()  # never answers
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [s.endpoint()]),))).start()
        c = await H2Client.connect(px.port)
        grpc_headers = [(b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"300m")]
        r = await c.get("/hostmesh.testapp.v1.Echo/Echo", method=b"POST", headers=grpc_headers,
                        body=b"\x00\x00\x00\x00\x00")
        assert r.status == 200 and r.headers[b"grpc-status"] == b"4"  # trailers-only DEADLINE_EXCEEDED
        assert r.headers[b"x-hostmesh-flags"] == b"UT"
        sent = dict(s.heads[0].headers)
        assert sent[b"grpc-timeout"].endswith((b"u", b"n", b"m"))
        assert 0 < http2_timeout(sent[b"grpc-timeout"]) <= 0.3 + 1e-6  # the time left, rounded up to its unit
        await eventually(lambda: s.resets)
        assert s.resets[0][1] == http2.CANCEL
        assert px.count("200", "UT", protocol="grpc") == 1
        c.close()
        px.close()
        s.close()
    run(main())


def http2_timeout(value: bytes) -> float:
    from nodeagent.proxy.l7.grpc import parse_timeout
    return parse_timeout(value)


def test_flow_control_holds_a_client_upload_while_the_upstream_does_not_read():
    async def main():
        stalled = []

        class Stall(ScriptedH2):  # reads the head, then never acknowledges DATA
            def data_received(self, data):
                for ev in self.codec.receive_data(data):
                    if type(ev) is http2.RequestHead:
                        stalled.append(ev)
                    elif type(ev) is http2.Data:
                        self.owner.received += len(ev.data)
                self.write(self.codec.data_to_send())
        s = ScriptedServer(None)
        s.server = await asyncio.get_running_loop().create_server(lambda: Stall(s), LO, 0)
        s.port = s.server.sockets[0].getsockname()[1]
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [s.endpoint()], app_protocol="http2"),))).start()
        c = await H2Client.connect(px.port)
        sid, reply = c.request("/up", method=b"POST", body=b"x" * (8 * 1024 * 1024), end=False)
        await eventually(lambda: stalled)
        await asyncio.sleep(0.5)
        # the upstream's window (256 KiB) took what it could; the proxy holds at most what the
        # client's windows allowed, so the client has most of its 8 MiB still queued
        assert s.received <= 256 * 1024
        assert c.codec.buffered >= 8 * 1024 * 1024 - 2 * 1024 * 1024
        c.close()
        px.close()
        s.close()
    run(main())


# ============================================================================ protections
def test_rapid_reset_gets_goaway_enhance_your_calm():
    async def main():
        s = await ScriptedServer(lambda conn, head: None).start()
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [s.endpoint()], app_protocol="http2"),)),
                         h2limits=Http2Limits(max_resets=50)).start()
        c = await H2Client.connect(px.port)
        for i in range(200):
            if c.goaway is not None or c.closed.done():
                break
            sid, _ = c.request(f"/r{i}")
            c.t.write(c.codec.reset(sid))
            await asyncio.sleep(0)
        await asyncio.wait_for(c.closed, 10)
        assert c.goaway is not None and c.goaway.error_code == http2.ENHANCE_YOUR_CALM
        await eventually(lambda: len(px.done) == 1)
        px.close()
        s.close()
    run(main())


def frame_types(data: bytes) -> list[int]:
    """The type of each HTTP/2 frame in ``data`` (whole frames from the start)."""
    types, i = [], 0
    while i + 9 <= len(data):
        types.append(data[i + 3])
        i += 9 + int.from_bytes(data[i:i + 3], "big")
    return types


def test_preface_only_is_closed_after_the_header_timeout_and_idle_connections_after_idle_timeout():
    async def main():
        up = await Upstream("v1").start()
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [up.endpoint()]),)),
                         limits=L7Limits(header_timeout=0.3, idle_timeout=0.5)).start()
        r, w = await asyncio.open_connection(LO, px.port)
        w.write(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # preface + empty SETTINGS, then nothing
        data = await asyncio.wait_for(r.read(-1), 10)  # the proxy closes: read() returns at EOF
        assert frame_types(data)[0] == 0x4 and frame_types(data)[-1] == 0x7  # SETTINGS first, GOAWAY last
        w.close()
        c = await H2Client.connect(px.port)
        assert (await c.get("/")).status == 200
        await asyncio.wait_for(c.closed, 10)  # idle after its only request
        assert c.goaway is not None and c.goaway.error_code == 0
        await eventually(lambda: len(px.done) == 2)
        px.close()
        up.close()
    run(main())


def test_serve_http2_takes_over_a_transport_reports_done_once_and_drain_finishes_streams():
    async def main():
        held = []
        s = await ScriptedServer(lambda conn, head: held.append((conn, head.stream_id))).start()
        snap = NodeSnapshot(NODE, (service("web", VIP, [s.endpoint()], app_protocol="http2"),))
        inputs = L7Inputs.create(NODE, HttpMetrics(CollectorRegistry()))
        done, drivers = [], []

        class Detect(asyncio.Protocol):  # stands in for the listener's detection phase
            def connection_made(self, transport):
                self.t = transport
                self.buf = b""

            def data_received(self, data):
                self.buf += data
                if len(self.buf) < len(H2_PREFACE):
                    return
                ctx = ConnContext.for_connection(inputs, snap, src_ip=LO, dst_ip=VIP, dst_port=80,
                                                 reporter="source", on_done=done.append)
                self.t.pause_reading()
                drivers.append(serve_http2(self.t, self.buf, ctx, inputs))

        server = await asyncio.get_running_loop().create_server(Detect, LO, 0)
        c = await H2Client.connect(server.sockets[0].getsockname()[1])
        _, reply = c.request("/held")
        await eventually(lambda: held)
        drivers[0].drain()
        await eventually(lambda: c.goaway is not None)
        assert c.goaway.error_code == 0 and not done  # graceful: the open stream continues
        conn, sid = held[0]
        conn.answer(sid, b"done")
        r = await asyncio.wait_for(reply.done, 10)
        assert r.status == 200 and bytes(r.body) == b"done"
        await asyncio.wait_for(c.closed, 10)
        await eventually(lambda: done)
        await asyncio.sleep(0.05)
        assert done == drivers
        server.close()
        inputs.pool.close()
        inputs.h2pool.close()
        s.close()
    run(main())


# ============================================================================ gRPC with grpcio against the test app
class AppProcess:
    """``python -m meshlab.testapp`` in a subprocess (HTTP and gRPC on free ports)."""

    def __init__(self, pod: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.p = subprocess.Popen([sys.executable, "-m", "meshlab.testapp", "--pod", pod, "--node", NODE, "--bind", LO,
                                   "--http-port", "0", "--grpc-port", "0", "--log-requests"],
                                  stderr=subprocess.PIPE, text=True, env=env)
        line = self.p.stderr.readline()
        self.http_port = int(line.split("http=")[1].split()[0].rsplit(":", 1)[1])
        self.grpc_port = int(line.split("grpc=")[1].split()[0].rsplit(":", 1)[1])
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stderr:
            self.lines.append(line)

    def grpc_endpoint(self) -> Endpoint:
        return Endpoint(LO, self.grpc_port, NODE, "app", NS)

    def close(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


@pytest.fixture(scope="module")
def grpc_apps():
    pytest.importorskip("grpc")
    a, b = AppProcess("g1"), AppProcess("g2")
    yield a, b
    a.close()
    b.close()


def grpc_snapshot(a: AppProcess, b: AppProcess) -> NodeSnapshot:
    svcs = (service("echo", VIP, [a.grpc_endpoint()], "grpc", port=9090),
            service("echo-v2", VIP2, [b.grpc_endpoint()], "grpc", port=9090),
            service("empty", VIP3, [], "grpc", port=9090))
    rules = [{"matches": [{"method": {"service": "hostmesh.testapp.v1.Echo", "method": "Bidi"}}],
              "backendRefs": [{"name": "echo-v2", "port": 9090}]},
             {"backendRefs": [{"name": "echo", "port": 9090}]}]
    return NodeSnapshot(NODE, svcs, config=(route("echo", {"parentRefs": parent("echo"), "rules": rules},
                                                  kind="GRPCRoute"),))


def test_grpc_unary_streaming_bidi_grpcroute_deadline_and_unavailable(grpc_apps):
    import grpc

    from meshlab.testapp import echo_pb2, echo_pb2_grpc
    a, b = grpc_apps

    async def main():
        px = await Proxy(grpc_snapshot(a, b), dst=(VIP, 9090)).start()
        px_empty = await Proxy(grpc_snapshot(a, b), dst=(VIP3, 9090)).start()

        def client():
            out = {}
            with grpc.insecure_channel(f"{LO}:{px.port}") as ch:
                stub = echo_pb2_grpc.EchoStub(ch)
                r = stub.Echo(echo_pb2.EchoRequest(message="hi", response_size=100_000), timeout=20)
                out["unary"] = (r.pod, r.message, len(r.payload), r.metadata.get("x-forwarded-for"))
                out["server"] = [m.count for m in stub.ServerStream(
                    echo_pb2.StreamRequest(message="s", count=50, response_size=1000), timeout=20)]
                out["client"] = stub.ClientStream(iter([echo_pb2.EchoRequest(message=str(i)) for i in range(30)]),
                                                  timeout=20).count
                bidi = list(stub.Bidi(iter([echo_pb2.EchoRequest(message=str(i)) for i in range(20)]), timeout=20))
                out["bidi"] = ([m.count for m in bidi], {m.pod for m in bidi})
                try:
                    stub.Echo(echo_pb2.EchoRequest(message="slow", delay_ms=5000), timeout=0.3)
                except grpc.RpcError as e:
                    out["deadline"] = e.code()
                try:
                    stub.Echo(echo_pb2.EchoRequest(status_code=5, status_message="nope"), timeout=20)
                except grpc.RpcError as e:
                    out["app_error"] = (e.code(), e.details())
            with grpc.insecure_channel(f"{LO}:{px_empty.port}") as ch:
                try:
                    echo_pb2_grpc.EchoStub(ch).Echo(echo_pb2.EchoRequest(message="x"), timeout=20)
                except grpc.RpcError as e:
                    out["unavailable"] = (e.code(), dict(e.trailing_metadata() or ()).get("x-hostmesh-flags"))
            return out
        out = await asyncio.to_thread(client)
        assert out["unary"] == ("g1", "hi", 100_000, LO)
        assert out["server"] == list(range(1, 51))
        assert out["client"] == 30
        assert out["bidi"] == (list(range(1, 21)), {"g2"})  # the GRPCRoute method match
        assert out["deadline"] == grpc.StatusCode.DEADLINE_EXCEEDED
        assert out["app_error"] == (grpc.StatusCode.NOT_FOUND, "nope")  # trailers passed through
        assert out["unavailable"] == (grpc.StatusCode.UNAVAILABLE, "UH")
        await eventually(lambda: any('"/hostmesh.testapp.v1.Echo/Echo" CANCELLED' in ln for ln in a.lines))
        assert px.count("200", "-", protocol="grpc") >= 5
        px.close()
        px_empty.close()
    run(main())


# ============================================================================ memory
PROXY_SCRIPT = textwrap.dedent("""
    import asyncio, random, sys, uvloop
    from prometheus_client import CollectorRegistry
    from nodeagent.proxy.l7.context import L7Inputs
    from nodeagent.proxy.l7.http2_proxy import listen_http2
    from nodeagent.proxy.l7.metrics import HttpMetrics
    from nodeagent.state import Endpoint, NodeSnapshot, Service, ServicePort

    async def main(port, app_protocol):
        ep = Endpoint("127.0.0.1", port, "node-1", "big", "shop")
        snap = NodeSnapshot("node-1", (Service("web", "shop", "198.19.0.10",
                                               (ServicePort(80, port, app_protocol=app_protocol),), (ep,)),))
        inputs = L7Inputs.create("node-1", HttpMetrics(CollectorRegistry()))
        server = await listen_http2(inputs, lambda: snap, "127.0.0.1", 0, dst=("198.19.0.10", 80))
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    uvloop.run(main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else ""))
""")


@needs("curl")
def test_100_mib_upload_and_download_through_one_stream_with_bounded_memory():
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    app = AppProcess("big")
    proxy = subprocess.Popen([sys.executable, "-c", PROXY_SCRIPT, str(app.http_port)], stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        pport = int(proxy.stdout.readline())
        base = f"http://{LO}:{pport}"
        curl = ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code} %{size_download}"]
        subprocess.run(curl + [f"{base}/?size=1M"], check=True, timeout=60, capture_output=True)
        before = _rss_kib(proxy.pid, "VmRSS")
        down = subprocess.run(curl + [f"{base}/?size=100M"], check=True, capture_output=True, text=True, timeout=120)
        assert down.stdout == f"200 {100 * 1024 * 1024}"
        up = subprocess.run(f"head -c {100 * 1024 * 1024} /dev/zero | {' '.join(curl[:-1])} '%{{http_code}} "
                            f"%{{size_download}}' --data-binary @- {base}/echo",
                            shell=True, check=True, capture_output=True, text=True, timeout=120)
        assert up.stdout == f"200 {100 * 1024 * 1024}"
        peak = _rss_kib(proxy.pid, "VmHWM")
        assert peak - before < 8 * 1024, (before, peak)
    finally:
        _terminate(proxy)
        app.close()


def _terminate(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()


def test_100_mib_grpc_streams_both_ways_over_an_http2_upstream_with_bounded_memory():
    grpc = pytest.importorskip("grpc")
    from meshlab.testapp import echo_pb2, echo_pb2_grpc
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    app = AppProcess("big")
    proxy = subprocess.Popen([sys.executable, "-c", PROXY_SCRIPT, str(app.grpc_port), "grpc"], stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        pport = int(proxy.stdout.readline())
        mib = 1024 * 1024
        with grpc.insecure_channel(f"{LO}:{pport}") as ch:
            stub = echo_pb2_grpc.EchoStub(ch)
            stub.Echo(echo_pb2.EchoRequest(message="warm", response_size=mib), timeout=30)
            before = _rss_kib(proxy.pid, "VmRSS")
            got = sum(len(m.payload) for m in stub.ServerStream(
                echo_pb2.StreamRequest(message="down", count=100, response_size=mib), timeout=120))
            assert got == 100 * mib
            chunk = b"x" * mib
            r = stub.ClientStream(iter([echo_pb2.EchoRequest(message=chunk.decode()) for _ in range(100)]),
                                  timeout=120)
            assert r.count == 100
        peak = _rss_kib(proxy.pid, "VmHWM")
        assert peak - before < 8 * 1024, (before, peak)
    finally:
        _terminate(proxy)
        app.close()


# ============================================================================ mirrors, stream timeouts
def test_mirror_gets_copies_over_http1_and_the_client_sees_only_the_primary():
    async def main():
        v1, shadow = await Upstream("v1").start(), await Upstream("shadow").start()
        svcs = (service("web", VIP, [v1.endpoint()]), service("web-shadow", VIP2, [shadow.endpoint()]))
        snap = NodeSnapshot(NODE, svcs, config=(route("web", {"parentRefs": parent(), "rules": [{
            "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "web-shadow", "port": 80}}}],
            "backendRefs": [{"name": "web", "port": 80}]}]}),))
        px = await Proxy(snap).start()
        c = await H2Client.connect(px.port)
        replies = await asyncio.gather(*(c.get(f"/m{i}", method=b"POST", body=b"copy me") for i in range(10)))
        assert {json.loads(r.body)["pod"] for r in replies} == {"v1"}
        await eventually(lambda: shadow.log.getvalue().count("\n") == 10)
        log = shadow.log.getvalue()
        assert all(f'"POST /m{i}" 200 in=7 ' in log for i in range(10)), log  # each with its whole body
        c.close()
        px.close()
        v1.close()
        shadow.close()
    run(main())


def test_stream_idle_timeout_answers_504_ut_while_waiting_and_408_si_for_a_stalled_upload():
    async def main():
        s = await ScriptedServer(lambda conn, head: None).start()  # takes requests, never answers
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [s.endpoint()], app_protocol="http2"),)),
                         limits=L7Limits(stream_idle_timeout=0.3)).start()
        c = await H2Client.connect(px.port)
        r = await c.get("/wait")
        assert r.status == 504 and r.headers[b"x-hostmesh-flags"] == b"UT"
        _, stalled = c.request("/upload", method=b"POST", body=b"part", end=False)
        r = await asyncio.wait_for(stalled.done, 10)
        assert r.status == 408 and r.headers[b"x-hostmesh-flags"] == b"SI"
        await eventually(lambda: len(s.resets) >= 2)  # both upstream streams were reset
        c.close()
        px.close()
        s.close()
    run(main())


def test_mirror_of_a_grpc_request_goes_over_http2_and_a_dead_mirror_changes_nothing():
    async def main():
        primary = await ScriptedServer(lambda conn, head: conn.answer(
            head.stream_id, b"\x00\x00\x00\x00\x00", headers=[(b"content-type", b"application/grpc")],
            trailers=[(b"grpc-status", b"0")])).start()
        mirror = await ScriptedServer(lambda conn, head: conn.answer(head.stream_id, b"dropped")).start()
        dead = Endpoint(LO, 1, NODE, "dead", NS)  # nothing listens on port 1
        svcs = (service("web", VIP, [primary.endpoint()], "grpc"), service("shadow", VIP2, [mirror.endpoint()], "grpc"),
                service("gone", VIP3, [dead], "grpc"))
        mirrors = [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": n, "port": 80}}}
                   for n in ("shadow", "gone")]
        snap = NodeSnapshot(NODE, svcs, config=(route("web", {"parentRefs": parent(), "rules": [
            {"filters": mirrors, "backendRefs": [{"name": "web", "port": 80}]}]}),))
        px = await Proxy(snap).start()
        c = await H2Client.connect(px.port)
        grpc_headers = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        replies = await asyncio.gather(*(c.get("/pkg.Svc/Call", method=b"POST", headers=grpc_headers,
                                               body=b"\x00\x00\x00\x00\x03abc") for _ in range(5)))
        assert all(r.status == 200 and r.trailers[b"grpc-status"] == b"0" for r in replies)
        assert all(bytes(r.body) == b"\x00\x00\x00\x00\x00" for r in replies)
        await eventually(lambda: len(mirror.heads) == 5 and mirror.received == 5 * 8)
        assert {h.authority for h in mirror.heads} == {b"web-shadow"}
        assert {h.path for h in mirror.heads} == {b"/pkg.Svc/Call"}
        c.close()
        px.close()
        primary.close()
        mirror.close()
    run(main())


def test_peer_stream_limit_is_respected_then_queued_with_a_bound_then_503_uo():
    async def main():
        held = []

        class OneStream(ScriptedH2):  # SETTINGS_MAX_CONCURRENT_STREAMS 1
            def __init__(self, owner):
                super().__init__(owner)
                self.codec = ServerConnection(Http2Limits(max_concurrent_streams=1))
        s = ScriptedServer(lambda conn, head: held.append((conn, head.stream_id)))
        s.server = await asyncio.get_running_loop().create_server(lambda: OneStream(s), LO, 0)
        s.port = s.server.sockets[0].getsockname()[1]
        policy = ConfigObject("TrafficPolicy", NS, "tp", json.dumps({
            "targetRef": {"kind": "Service", "name": "web"},
            "connectionPool": {"maxConnections": 1, "maxPendingRequests": 1}}))
        snap = NodeSnapshot(NODE, (service("web", VIP, [s.endpoint()], "http2"),), config=(policy,))
        px = await Proxy(snap).start()
        c = await H2Client.connect(px.port)
        _, first = c.request("/1")
        await eventually(lambda: held)
        stats = lambda: next(iter(px.inputs.h2pool.stats().values()))  # noqa: E731
        await eventually(lambda: stats()["capacity"] == 0)  # the peer's SETTINGS arrived: 1 stream max
        _, second = c.request("/2")
        await eventually(lambda: stats()["pending"] == 1)
        third = await c.get("/3")
        assert third.status == 503 and third.headers[b"x-hostmesh-flags"] == b"UO"
        assert len(held) == 1 and len(s.conns) == 1  # never more than the peer allows
        conn, sid = held[0]
        conn.answer(sid, b"one")
        assert bytes((await asyncio.wait_for(first.done, 10)).body) == b"one"
        await eventually(lambda: len(held) == 2)  # the queued stream got the freed slot
        conn, sid = held[1]
        conn.answer(sid, b"two")
        assert bytes((await asyncio.wait_for(second.done, 10)).body) == b"two"
        c.close()
        px.close()
        s.close()
    run(main())


def test_connector_partition_and_reuse_ok_rules_apply_to_http2_upstreams():
    async def main():
        from nodeagent.proxy.l7.pool import tcp_connector
        s = await ScriptedServer(lambda conn, head: conn.answer(head.stream_id, b"ok")).start()
        generation = {"now": 0}
        dials = []

        async def connector(endpoint, dial, factory):
            dials.append(dial.conn.src_ip)
            transport, proto = await tcp_connector(endpoint, dial, factory)
            born = generation["now"]
            proto.reuse_ok = lambda: generation["now"] == born  # the tunnel's age / rotation rules
            return transport, proto
        px = await Proxy(NodeSnapshot(NODE, (service("web", VIP, [s.endpoint()], "http2"),)), connector=connector,
                         partition=lambda ep, ctx: id(ctx)).start()  # one pool per client connection
        a, b = await H2Client.connect(px.port), await H2Client.connect(px.port)
        for c in (a, b, a, b):
            assert (await c.get("/")).status == 200
        assert len(s.conns) == 2 and len(dials) == 2  # never shared between the two clients
        generation["now"] += 1  # e.g. the source's certificate rotated
        assert (await a.get("/")).status == 200
        assert len(s.conns) == 3  # a fresh connection; the retired one is closed
        await eventually(lambda: s.conns[0].t.is_closing() or s.conns[1].t.is_closing())
        a.close()
        b.close()
        px.close()
        s.close()
    run(main())
