"""HTTP/1.1 clients of a Service port that speaks HTTP/2: the HTTP/1.1 driver translates.

The proxy is ``listen_http1`` (the driver without capture); the Service port declares
``appProtocol: http2``, so the driver carries each exchange over a stream of its HTTP/2
pool (Envoy: codec AUTO downstream, an HTTP/2 cluster upstream). Upstreams: the mesh test
app (HTTP/1.1 and HTTP/2 prior knowledge on one port; its JSON answer names the protocol
it saw) and a scripted HTTP/2 server on ``http2.ServerConnection`` where a test needs to
steer frames (trailers, resets, GOAWAY, stalls). Clients: curl, ``http.client`` and raw
sockets for exact bytes. No assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import random
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.proxy.l7 import http2
from nodeagent.proxy.l7.context import L7Inputs, L7Limits
from nodeagent.proxy.l7.http1_proxy import listen_http1
from nodeagent.proxy.l7.metrics import HttpMetrics
from nodeagent.state import Endpoint, NodeSnapshot
from tests.test_l7_http1_proxy import PROXY_SCRIPT, WS_GUID, Upstream, WsEcho, _rss_kib, parent, raw, route
from tests.test_l7_http2_proxy import (AppProcess, ScriptedH2, ScriptedServer, _goaway, _terminate, eventually,
                                       needs, run, service, sh)

pytestmark = pytest.mark.timeout(120)

LO = "127.0.0.1"
NODE = "node-1"
NS = "shop"
VIP, VIP2 = "198.19.0.10", "198.19.0.11"  # only looked up in snapshots


class Proxy:
    """``listen_http1`` in the test's loop, both upstream pools closed at the end."""

    def __init__(self, snapshot: NodeSnapshot, *, limits: L7Limits | None = None) -> None:
        self.snapshot = snapshot
        self.registry = CollectorRegistry()
        self.inputs = L7Inputs.create(NODE, HttpMetrics(self.registry), limits=limits, rand=random.Random(1))
        self.done: list = []

    async def start(self) -> "Proxy":
        self.server = await listen_http1(self.inputs, lambda: self.snapshot, LO, 0, dst=(VIP, 80),
                                         on_done=self.done.append)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        self.server.close()
        self.inputs.pool.close()
        self.inputs.h2pool.close()

    def count(self, code: str, flags: str = "-", protocol: str = "http") -> float:
        return sum(s.value for m in self.registry.collect() for s in m.samples
                   if s.name == "hostmesh_requests_total" and s.labels["response_code"] == code
                   and s.labels["response_flags"] == flags and s.labels["request_protocol"] == protocol)


def h2_snapshot(ep: Endpoint, app_protocol: str = "http2", extra=(), config=()) -> NodeSnapshot:
    return NodeSnapshot(NODE, (service("web", VIP, [ep], app_protocol=app_protocol),) + tuple(extra), config=config)


def request(port: int, reqs, *, timeout: float = 30):
    """``(method, path, headers, body)`` requests on one keep-alive ``http.client`` connection."""
    c = http.client.HTTPConnection(LO, port, timeout=timeout)
    out = []
    try:
        for method, path, headers, body in reqs:
            headers = headers or {}
            c.request(method, path, body=body, headers=headers, encode_chunked="Transfer-Encoding" in headers)
            r = c.getresponse()
            out.append((r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()))
    finally:
        c.close()
    return out


# ============================================================================ the basics
@needs("curl")
@pytest.mark.parametrize("app_protocol", ["http2", "grpc", "h2c", "kubernetes.io/h2c"])
def test_http1_requests_reach_the_upstream_over_http2_and_share_one_connection(app_protocol):
    async def main():
        up = await Upstream("v1").start()
        px = await Proxy(h2_snapshot(up.endpoint(), app_protocol)).start()
        base = f"http://{LO}:{px.port}"
        # curl: two GETs on one keep-alive connection
        rc, out, err = await sh("curl", "-sS", "--http1.1", "-H", "x-request-id: rid-7", f"{base}/a?x=1",
                                f"{base}/b")
        assert rc == 0, err
        a, b = (json.loads(line) for line in out.replace("}{", "}\n{").splitlines())
        assert a["protocol"] == b["protocol"] == "HTTP/2"
        assert a["path"] == "/a" and a["query"] == "x=1" and b["path"] == "/b"
        assert a["host"] == f"{LO}:{px.port}"  # Host became :authority
        assert a["headers"]["x-forwarded-for"] == LO and a["headers"]["x-request-id"] == "rid-7"
        assert "connection" not in a["headers"] and "host" not in a["headers"]
        # a length-delimited and a chunked upload, echoed; an HTTP/1.1 response framed by the codec
        payload = os.urandom(300_000)
        (s1, h1, b1), (s2, h2_, b2), (s3, h3, b3) = await asyncio.to_thread(request, px.port, [
            ("POST", "/echo", {}, payload),
            ("PUT", "/echo", {"Transfer-Encoding": "chunked"}, iter([payload[:1000], payload[1000:]])),
            ("GET", "/?size=100k", {}, None)])
        assert (s1, b1) == (200, payload) and (s2, b2) == (200, payload)
        assert s3 == 200 and len(b3) == 100 * 1024
        for h in (h1, h2_, h3):  # the upstream's HTTP/2 answer, HTTP/1.1 framed
            assert "content-length" in h or h.get("transfer-encoding") == "chunked"
        assert up.accepted == 1  # every request, both clients: streams of one HTTP/2 connection
        assert px.count("200") == 5 and px.count("200", protocol="http2") == 0
        px.close()
        up.close()
    run(main())


def test_two_http1_clients_are_multiplexed_on_one_upstream_connection():
    async def main():
        held = []
        tasks = []

        async def answer_once_the_body_is_in(c, h):
            while c.received < 4:
                await asyncio.sleep(0.005)
            c.answer(h.stream_id, b"stream %d" % h.stream_id)

        def on_request(conn, head):  # answers only once both requests are open at the same time
            held.append((conn, head))
            if len(held) == 2:
                for c, h in held:
                    if h.method == b"POST":  # (answered before its body, the proxy may rightly stop sending it)
                        tasks.append(asyncio.get_running_loop().create_task(answer_once_the_body_is_in(c, h)))
                    else:
                        c.answer(h.stream_id, b"stream %d" % h.stream_id)
        s = await ScriptedServer(on_request).start()
        px = await Proxy(h2_snapshot(s.endpoint())).start()
        (r1,), (r2,) = await asyncio.gather(
            asyncio.to_thread(request, px.port, [("GET", "/one", {}, None)]),
            asyncio.to_thread(request, px.port, [("POST", "/two", {}, b"body")]))
        assert r1[0] == r2[0] == 200 and {r1[2], r2[2]} == {b"stream 1", b"stream 3"}
        assert len(s.conns) == 1 and s.received == 4
        assert sorted(h.path for h in s.heads) == [b"/one", b"/two"]
        post = next(h for h in s.heads if h.path == b"/two")
        assert post.method == b"POST" and post.content_length == 4 and post.authority == f"{LO}:{px.port}".encode()
        px.close()
        s.close()
    run(main())


def test_pipelined_requests_are_answered_in_order_over_http2():
    async def main():
        up = await Upstream("v1").start()
        px = await Proxy(h2_snapshot(up.endpoint())).start()
        reqs = b"".join(b"GET /p%d?delay=%s HTTP/1.1\r\nHost: web\r\n\r\n" % (i, b"0.05" if i % 2 else b"0")
                        for i in range(6))
        out = await raw(px.port, reqs + b"GET /last HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        paths = [json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"\r\n")[0] if b"chunked" in part else
                            part.split(b"\r\n\r\n", 1)[1])["path"] for part in _responses(out)]
        assert paths == [f"/p{i}" for i in range(6)] + ["/last"]
        assert up.accepted == 1
        px.close()
        up.close()
    run(main())


def _responses(out: bytes) -> list[bytes]:
    """Split a stream of content-length framed responses."""
    parts = []
    while out:
        head, rest = out.split(b"\r\n\r\n", 1)
        n = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")))
        parts.append(head + b"\r\n\r\n" + rest[:n])
        out = rest[n:]
    return parts


def test_http10_client_gets_a_close_delimited_body_and_head_keeps_content_length():
    async def main():
        def on_request(conn, head):
            if head.method == b"HEAD":
                conn.write(conn.codec.send_response(head.stream_id, 200, [(b"content-length", b"1234")],
                                                    end_stream=True))
                return
            conn.write(conn.codec.send_response(head.stream_id, 200, [(b"content-type", b"text/plain")]))
            conn.write(conn.codec.send_data(head.stream_id, b"no length announced"))
            conn.write(conn.codec.send_end(head.stream_id))
        s = await ScriptedServer(on_request).start()
        px = await Proxy(h2_snapshot(s.endpoint())).start()
        out = await raw(px.port, b"GET /old HTTP/1.0\r\n\r\n")  # no Host: the authority is the Service's
        head, body = out.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
        assert b"content-length" not in head.lower() and b"chunked" not in head.lower()
        assert body == b"no length announced"
        out = await raw(px.port, b"GET /new HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        head, body = out.split(b"\r\n\r\n", 1)
        assert b"transfer-encoding: chunked" in head.lower() and body == b"13\r\nno length announced\r\n0\r\n\r\n"
        out = await raw(px.port, b"HEAD /h HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        assert out.endswith(b"\r\n\r\n") and b"content-length: 1234" in out.lower()
        assert s.heads[0].authority and s.heads[1].authority == b"web"
        px.close()
        s.close()
    run(main())


# ============================================================================ trailers, gRPC
def test_trailers_reach_only_clients_that_sent_te_trailers_and_trailers_only_answers_are_sensible():
    async def main():
        def on_request(conn, head):
            if head.path == b"/trailers-only":  # a gRPC error: HEADERS with END_STREAM, no body
                conn.write(conn.codec.send_response(head.stream_id, 200, [
                    (b"content-type", b"application/grpc"), (b"grpc-status", b"14"),
                    (b"grpc-message", b"unavailable")], end_stream=True))
                return
            conn.answer(head.stream_id, b"payload", headers=[(b"content-type", b"application/grpc")],
                        trailers=[(b"grpc-status", b"0"), (b"x-checksum", b"abc")])
        s = await ScriptedServer(on_request).start()
        px = await Proxy(h2_snapshot(s.endpoint(), "grpc")).start()
        out = await raw(px.port, b"POST /svc/M HTTP/1.1\r\nHost: web\r\nTE: trailers\r\nContent-Length: 3\r\n"
                                 b"Connection: close\r\n\r\nabc")
        head, body = out.split(b"\r\n\r\n", 1)
        assert b"transfer-encoding: chunked" in head.lower()
        assert body == b"7\r\npayload\r\n0\r\ngrpc-status: 0\r\nx-checksum: abc\r\n\r\n"
        assert (b"te", b"trailers") in s.heads[0].headers  # forwarded: gRPC servers require it
        out = await raw(px.port, b"POST /svc/M HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n"
                                 b"Connection: close\r\n\r\nabc")
        head, body = out.split(b"\r\n\r\n", 1)
        assert body == b"7\r\npayload\r\n0\r\n\r\n"  # no TE: trailers: dropped (RFC 9110 6.5.1)
        out = await raw(px.port, b"POST /trailers-only HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
        head, body = out.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 0" in head.lower()
        assert b"grpc-status: 14" in head and b"grpc-message: unavailable" in head and body == b""
        px.close()
        s.close()
    run(main())


def test_chunked_upload_with_trailers_goes_upstream_as_data_and_trailing_headers():
    async def main():
        got = []
        flags = []  # END_STREAM on each DATA frame

        class Recorder(ScriptedH2):
            def data_received(self, data):
                for ev in self.codec.receive_data(data):
                    if type(ev) is http2.RequestHead:
                        self.owner.heads.append(ev)
                    elif type(ev) is http2.Data:
                        got.append(ev.data)
                        flags.append(ev.end_stream)
                        self.write(self.codec.consumed(ev.stream_id, len(ev.data)))
                    elif type(ev) is http2.EndOfMessage:
                        got.append(ev.trailers)
                        self.answer(ev.stream_id, b"%d" % sum(len(g) for g in got if type(g) is bytes))
                self.write(self.codec.data_to_send())
        s = ScriptedServer(None)
        s.server = await asyncio.get_running_loop().create_server(lambda: Recorder(s), LO, 0)
        s.port = s.server.sockets[0].getsockname()[1]
        px = await Proxy(h2_snapshot(s.endpoint())).start()
        out = await raw(px.port, b"POST /up HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n"
                                 b"Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n")
        assert out.split(b"\r\n\r\n", 1)[1] == b"11"
        assert b"".join(g for g in got if type(g) is bytes) == b"hello world"
        assert got[-1] == [(b"x-sum", b"11")]
        head = s.heads[0]
        assert head.content_length is None and not any(n in (b"transfer-encoding", b"content-length")
                                                       for n, _ in head.headers)
        assert not any(flags)  # the trailers carry END_STREAM
        # a length-delimited body: its last piece and END_STREAM share one DATA frame
        got.clear()
        flags.clear()
        out = await raw(px.port, b"PUT /put HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n"
                                 b"Connection: close\r\n\r\nhello")
        assert out.split(b"\r\n\r\n", 1)[1] == b"5" and got == [b"hello", []] and flags == [True]
        assert s.heads[1].content_length == 5
        px.close()
        s.close()
    run(main())


# ============================================================================ failures
def test_upstream_reset_before_the_response_is_503_uc_and_after_it_started_resets_the_client():
    async def main():
        def on_request(conn, head):
            if head.path == b"/midway":
                conn.write(conn.codec.send_response(head.stream_id, 200, [(b"content-length", b"100")]))
                conn.write(conn.codec.send_data(head.stream_id, b"x" * 10))
                conn.write(conn.codec.reset(head.stream_id, http2.INTERNAL_ERROR))
            else:
                conn.write(conn.codec.reset(head.stream_id, http2.INTERNAL_ERROR))
        s = await ScriptedServer(on_request).start()
        px = await Proxy(h2_snapshot(s.endpoint())).start()
        (st, h, body), = await asyncio.to_thread(request, px.port, [("GET", "/reset", {}, None)])
        assert st == 503 and h["x-hostmesh-flags"] == "UC"
        r, w = await asyncio.open_connection(LO, px.port)
        w.write(b"GET /midway HTTP/1.1\r\nHost: web\r\n\r\n")
        got = b""
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            while True:  # the head and 10 of 100 bytes, then a reset (never a clean end)
                chunk = await asyncio.wait_for(r.read(65536), 10)
                if not chunk:
                    raise asyncio.IncompleteReadError(got, None)
                got += chunk
        assert got == b"" or got.startswith(b"HTTP/1.1 200")
        w.close()
        await eventually(lambda: px.count("0", "UC") == 1)
        assert px.count("503", "UC") == 1
        # the upstream connection survives its streams' resets
        (st, _, _), = await asyncio.to_thread(request, px.port, [("GET", "/reset", {}, None)])
        assert st == 503 and len(s.conns) == 1
        px.close()
        s.close()
    run(main())


def test_connect_failure_is_503_uf_and_a_full_queue_503_uo():
    async def main():
        px = await Proxy(h2_snapshot(Endpoint(LO, 1, NODE, "dead", NS))).start()  # nothing listens on port 1
        (st, h, body), = await asyncio.to_thread(request, px.port, [("GET", "/", {}, None)])
        assert st == 503 and h["x-hostmesh-flags"] == "UF"
        assert px.count("503", "UF") == 1
        px.close()

        held = []

        class OneStream(ScriptedH2):  # SETTINGS_MAX_CONCURRENT_STREAMS 1, never answers
            def __init__(self, owner):
                super().__init__(owner)
                self.codec = http2.ServerConnection(http2.Http2Limits(max_concurrent_streams=1))
        s = ScriptedServer(lambda conn, head: held.append(head))
        s.server = await asyncio.get_running_loop().create_server(lambda: OneStream(s), LO, 0)
        s.port = s.server.sockets[0].getsockname()[1]
        ep = s.endpoint()
        snap = NodeSnapshot(NODE, (service("web", VIP, [ep], app_protocol="http2"),), config=(
            ConfigObject_("TrafficPolicy", "lim", {"targetRef": {"kind": "Service", "name": "web"},
                                                   "connectionPool": {"maxConnections": 1,
                                                                      "maxPendingRequests": 1}}),))
        px = await Proxy(snap).start()
        stats = lambda: next(iter(px.inputs.h2pool.stats().values()))  # noqa: E731
        clients = []
        for i in range(2):  # one open stream, one waiting for a slot
            r, w = await asyncio.open_connection(LO, px.port)
            w.write(b"GET /wait HTTP/1.1\r\nHost: web\r\n\r\n")
            clients.append(w)
            if i == 0:  # the peer's SETTINGS arrived: 1 stream at most
                await eventually(lambda: len(held) == 1 and stats()["capacity"] == 0)
        await eventually(lambda: stats()["pending"] == 1)
        (st, h, _), = await asyncio.to_thread(request, px.port, [("GET", "/over", {}, None)])
        assert st == 503 and h["x-hostmesh-flags"] == "UO"
        for w in clients:
            w.close()
        px.close()
        s.close()
    run(main())


def ConfigObject_(kind: str, name: str, spec: dict):
    from nodeagent.state import ConfigObject
    return ConfigObject(kind, NS, name, json.dumps(spec))


def test_upstream_goaway_retries_unprocessed_requests_on_a_new_connection():
    async def main():
        tasks = []

        async def answer_once_the_body_is_in(conn, head):  # (before it, the proxy may rightly stop sending it)
            while conn.received < len(b"payload"):
                await asyncio.sleep(0.005)
            conn.answer(head.stream_id, b"served by conn %d" % s.conns.index(conn))

        def on_request(conn, head):
            if head.path == b"/goaway" and len(s.conns) == 1:
                conn.t.write(_goaway(0))  # never processed: the proxy may retry it
                conn.t.close()
            elif head.path == b"/goaway":
                tasks.append(asyncio.get_running_loop().create_task(answer_once_the_body_is_in(conn, head)))
            elif head.path == b"/graceful":
                conn.answer(head.stream_id, b"last on conn %d" % s.conns.index(conn))
                conn.t.write(_goaway(head.stream_id))  # graceful: this one is answered, no new ones
            else:
                conn.answer(head.stream_id, b"served by conn %d" % s.conns.index(conn))
        s = await ScriptedServer(on_request).start()
        px = await Proxy(h2_snapshot(s.endpoint())).start()
        (st, _, body), = await asyncio.to_thread(request, px.port, [("POST", "/goaway", {}, b"payload")])
        assert (st, body) == (200, b"served by conn 1")
        assert s.conns[1].received == len(b"payload")  # the body was replayed on the new connection
        res = await asyncio.to_thread(request, px.port, [("GET", "/graceful", {}, None), ("GET", "/next", {}, None)])
        assert [(st, b) for st, _, b in res] == [(200, b"last on conn 1"), (200, b"served by conn 2")]
        assert px.count("200") == 3
        px.close()
        s.close()
    run(main())


def test_route_and_stream_idle_timeouts_are_504_ut_and_a_protocol_error_502_upe():
    async def main():
        up = await Upstream("v1").start()
        rules = [{"matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}], "timeouts": {"request": "300ms"},
                  "backendRefs": [{"name": "web", "port": 80}]},
                 {"backendRefs": [{"name": "web", "port": 80}]}]
        snap = h2_snapshot(up.endpoint(), config=(route("web", {"parentRefs": parent(), "rules": rules}),))
        px = await Proxy(snap, limits=L7Limits(stream_idle_timeout=0.5)).start()
        (st, h, _), = await asyncio.to_thread(request, px.port, [("GET", "/slow?delay=5", {}, None)])
        assert st == 504 and h["x-hostmesh-flags"] == "UT"
        (st, h, _), = await asyncio.to_thread(request, px.port, [("GET", "/other?delay=5", {}, None)])
        assert st == 504 and h["x-hostmesh-flags"] == "UT"  # stream idle: nothing moved for 0.5 s
        (st, _, body), = await asyncio.to_thread(request, px.port, [("GET", "/fine", {}, None)])
        assert st == 200 and json.loads(body)["protocol"] == "HTTP/2"
        assert px.count("504", "UT") == 2 and up.accepted == 1  # the streams were reset, the connection kept
        px.close()
        up.close()

        def on_request(conn, head):  # a response head HTTP/2 forbids (connection-specific field)
            conn.t.write(_headers_frame(head.stream_id, conn))
        s = await ScriptedServer(on_request).start()
        px = await Proxy(h2_snapshot(s.endpoint())).start()
        (st, h, _), = await asyncio.to_thread(request, px.port, [("GET", "/", {}, None)])
        assert st == 502 and h["x-hostmesh-flags"] == "UPE"
        px.close()
        s.close()
    run(main())


def _headers_frame(sid: int, conn: ScriptedH2) -> bytes:
    """HEADERS :status 200 + connection: close, encoded with the server's own HPACK state
    bypassed (a literal block without indexing), END_STREAM set."""
    def lit(name: bytes, value: bytes) -> bytes:
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value
    block = b"\x88" + lit(b"connection", b"close")  # 0x88: indexed :status 200
    return len(block).to_bytes(3, "big") + bytes([0x1, 0x5]) + sid.to_bytes(4, "big") + block


# ============================================================================ flow control, memory
def test_flow_control_pauses_the_client_both_ways_while_the_other_side_does_not_read():
    async def main():
        stalled = []

        class Stall(ScriptedH2):  # reads heads, never acknowledges DATA; answers /down with 32 MiB
            def data_received(self, data):
                for ev in self.codec.receive_data(data):
                    if type(ev) is http2.RequestHead:
                        stalled.append(ev)
                        if ev.path == b"/down":
                            self.write(self.codec.send_response(ev.stream_id, 200, []))
                            self.write(self.codec.send_data(ev.stream_id, b"y" * (32 << 20)))
                            self.write(self.codec.send_end(ev.stream_id))
                    elif type(ev) is http2.Data:
                        self.owner.received += len(ev.data)
                self.write(self.codec.data_to_send())
        s = ScriptedServer(None)
        s.server = await asyncio.get_running_loop().create_server(lambda: Stall(s), LO, 0)
        s.port = s.server.sockets[0].getsockname()[1]
        px = await Proxy(h2_snapshot(s.endpoint())).start()
        # upload: the upstream's stream window (256 KiB) takes what it can, then the proxy stops
        # reading the client, whose 32 MiB stay mostly in its own buffer
        r, w = await asyncio.open_connection(LO, px.port)
        w.write(b"POST /up HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n\r\n" % (32 << 20) + b"x" * (32 << 20))
        await eventually(lambda: stalled)
        await asyncio.sleep(0.5)
        assert s.received <= 256 * 1024
        assert w.transport.get_write_buffer_size() >= 16 << 20
        w.transport.abort()
        # download: a client that does not read; the proxy acknowledges the upstream's DATA only
        # while the client's transport drains, so the upstream keeps most of its 32 MiB queued
        r, w = await asyncio.open_connection(LO, px.port, limit=1024)
        w.transport.pause_reading()
        w.write(b"GET /down HTTP/1.1\r\nHost: web\r\n\r\n")
        await eventually(lambda: any(h.path == b"/down" for h in stalled))
        await asyncio.sleep(0.5)
        down_conn = s.conns[-1]
        assert down_conn.codec.buffered >= 16 << 20
        w.transport.resume_reading()  # and it all arrives once the client reads
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head
        total = 0
        while True:
            size = int((await asyncio.wait_for(r.readuntil(b"\r\n"), 30)).strip(), 16)
            if size == 0:
                break
            total += len(await asyncio.wait_for(r.readexactly(size), 30))
            await r.readexactly(2)
        assert total == 32 << 20
        w.close()
        px.close()
        s.close()
    run(main())




@needs("curl")
def test_10_mib_echo_and_64_mib_each_way_stream_over_http2_with_bounded_memory(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    app = AppProcess("big")
    proxy = subprocess.Popen([sys.executable, "-c", PROXY_SCRIPT, str(app.http_port), "http2"], stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        base = f"http://{LO}:{int(proxy.stdout.readline())}"
        curl = "curl -sS --http1.1"
        subprocess.run(f"{curl} -o /dev/null {base}/?size=1M", shell=True, check=True, timeout=60)
        before = _rss_kib(proxy.pid, "VmRSS")
        blob = tmp_path / "blob"
        blob.write_bytes(os.urandom(10 << 20))
        echo = subprocess.run(f"{curl} --data-binary @{blob} {base}/echo | sha256sum", shell=True, check=True,
                              capture_output=True, text=True, timeout=120)
        assert echo.stdout.split()[0] == hashlib.sha256(blob.read_bytes()).hexdigest()
        down = subprocess.run(f"{curl} -o /dev/null -w '%{{http_code}} %{{size_download}}' {base}/?size=64M",
                              shell=True, check=True, capture_output=True, text=True, timeout=120)
        assert down.stdout == f"200 {64 << 20}"
        up = subprocess.run(f"head -c {64 << 20} /dev/zero | {curl} -o /dev/null -w '%{{http_code}} "
                            f"%{{size_download}}' -H 'Transfer-Encoding: chunked' --data-binary @- {base}/echo",
                            shell=True, check=True, capture_output=True, text=True, timeout=120)
        assert up.stdout == f"200 {64 << 20}"
        peak = _rss_kib(proxy.pid, "VmHWM")
        assert peak - before < 8 * 1024, (before, peak)
        assert sum(" HTTP/2 " in line for line in app.lines) >= 4  # every request reached it over HTTP/2
    finally:
        _terminate(proxy)
        app.close()


# ============================================================================ upgrade, mirrors
def test_websocket_upgrade_on_an_http2_port_stays_on_http1():
    async def main():
        loop = asyncio.get_running_loop()
        ws = await loop.create_server(WsEcho, LO, 0)
        port = ws.sockets[0].getsockname()[1]
        px = await Proxy(h2_snapshot(Endpoint(LO, port, NODE, "ws", NS))).start()
        r, w = await asyncio.open_connection(LO, px.port)
        key = base64.b64encode(os.urandom(16))
        w.write(b"GET /chat HTTP/1.1\r\nHost: web\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert base64.b64encode(hashlib.sha1(key + WS_GUID).digest()) in head
        msg = b"over http/1.1"
        mask = os.urandom(4)
        w.write(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
        assert await asyncio.wait_for(r.readexactly(2 + len(msg)), 10) == bytes([0x81, len(msg)]) + msg
        w.close()
        px.close()
        ws.close()
    run(main())


def test_mirrors_use_http2_toward_an_http2_backend_and_http1_otherwise():
    async def main():
        primary, m1, m2 = await Upstream("primary").start(), await Upstream("m-h2").start(), \
            await Upstream("m-h1").start()
        svcs = (service("web", VIP, [primary.endpoint()], app_protocol="http2"),
                service("shadow-h2", VIP2, [m1.endpoint()], app_protocol="h2c"),
                service("shadow-h1", "198.19.0.12", [m2.endpoint()]))
        rules = [{"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": n, "port": 80}}}
                              for n in ("shadow-h2", "shadow-h1")],
                  "backendRefs": [{"name": "web", "port": 80}]}]
        snap = NodeSnapshot(NODE, svcs, config=(route("web", {"parentRefs": parent(), "rules": rules}),))
        px = await Proxy(snap).start()
        for i in range(5):
            (st, _, body), = await asyncio.to_thread(request, px.port, [("POST", f"/m{i}", {}, b"z" * 1000)])
            d = json.loads(body)
            assert st == 200 and d["pod"] == "primary" and d["protocol"] == "HTTP/2" and d["body_bytes"] == 1000
        await eventually(lambda: m1.requests == 5 and m2.requests == 5)
        assert m1.log.getvalue().count(" HTTP/2 ") == 5 and m1.log.getvalue().count(" in=1000 ") == 5
        assert m2.log.getvalue().count(" HTTP/1.1 ") == 5 and m2.log.getvalue().count(" in=1000 ") == 5
        px.close()
        for u in (primary, m1, m2):
            u.close()
    run(main())
