"""A reused upstream HTTP/1.1 connection that dies under a request: one retry, on a new connection.

The upstream is scripted (``StaleServer``, httptools on loopback, in the test's own uvloop
loop): it answers, or — on chosen requests of a connection — reads the request and closes
(FIN), resets (RST) or starts a response and closes. That is the keep-alive race a real
server's idle timeout causes (Node.js 5 s, nginx 75 s): the proxy wrote the request into a
connection the server was closing. Both drivers are checked: the HTTP/1.1 driver
(``listen_http1``) and the HTTP/2 driver's HTTP/1.1-upstream path (``listen_http2``).
No assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import os
import socket
import struct

import httptools
import pytest

from nodeagent.state import NodeSnapshot
from tests import test_l7_http1_proxy as h1t
from tests import test_l7_http2_proxy as h2t

pytestmark = pytest.mark.timeout(60)

LO = "127.0.0.1"

ANSWER, CLOSE, RESET, PARTIAL, HOLD = "answer", "close", "reset", "partial", "hold"


class _Conn(asyncio.Protocol):
    """One connection of ``StaleServer``: parses requests, acts as the plan says."""

    def __init__(self, server: "StaleServer", index: int) -> None:
        self.server = server
        self.index = index  # 1-based connection number
        self.nreq = 0
        self.parser = httptools.HttpRequestParser(self)
        self.body = bytearray()
        self.t = None

    def connection_made(self, transport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        if self.t.is_closing():
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.t.close()

    def on_message_begin(self) -> None:
        self.body = bytearray()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.nreq += 1
        method = self.parser.get_method()
        body = bytes(self.body)
        self.server.requests.append((self.index, self.nreq, method, body))
        action = self.server.plan(self.index, self.nreq)
        if action == ANSWER:
            self.answer(method, body)
        elif action == HOLD:  # answered with the next held request (two connections busy at once)
            held = self.server.held
            if held is None:
                self.server.held = (self, method, body)
            else:
                self.server.held = None
                held[0].answer(held[1], held[2])
                self.answer(method, body)
        elif action == CLOSE:
            self.t.close()
        elif action == RESET:
            self.t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.t.abort()
        elif action == PARTIAL:
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
            self.t.close()

    def answer(self, method: bytes, body: bytes) -> None:
        reply = expected(method, body)
        self.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(reply), reply))


class StaleServer:
    """``plan(connection, request) -> ANSWER | CLOSE | RESET | PARTIAL`` (both 1-based)."""

    def __init__(self, plan) -> None:
        self.plan = plan
        self.connections = 0
        self.requests: list[tuple[int, int, bytes, bytes]] = []  # (connection, nth, method, body)
        self.held = None  # a HOLD request waiting for the next one

    async def start(self) -> "StaleServer":
        def factory():
            self.connections += 1
            return _Conn(self, self.connections)
        self.server = await asyncio.get_running_loop().create_server(factory, LO, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def endpoint(self):
        return h1t.Endpoint(LO, self.port, h1t.NODE, "v1", h1t.NS)

    def close(self) -> None:
        self.server.close()


def dies_on_second(action: str):
    """The first connection answers its first request and then dies as ``action``; the others answer."""
    return lambda conn, nth: action if conn == 1 and nth == 2 else ANSWER


def retries(registry) -> float:
    for m in registry.collect():
        for s in m.samples:
            if s.name == "hostmesh_agent_upstream_retries_total" and s.labels["reason"] == "stale_keepalive":
                return s.value
    return 0.0


def expected(method: bytes, body: bytes) -> bytes:
    return b"%s %d %s" % (method, len(body), hashlib.sha256(body).hexdigest().encode())


# ============================================================================ HTTP/1.1 client
def h1_session(port: int, requests):
    """Requests one after another on one keep-alive client connection: [(status, body) | exception name]."""
    c = http.client.HTTPConnection(LO, port, timeout=30)
    out = []
    try:
        for method, path, body in requests:
            try:
                c.request(method, path, body=body)
                r = c.getresponse()
                out.append((r.status, r.read(), r.getheader("x-hostmesh-flags") or ""))
            except (http.client.HTTPException, OSError) as exc:
                out.append(type(exc).__name__)
                c.close()
    finally:
        c.close()
    return out


async def _h1_proxy(server: StaleServer):
    px = await h1t.Proxy(NodeSnapshot(h1t.NODE, (h1t.service("web", h1t.VIP, [server.endpoint()]),))).start()
    return px


@contextlib.asynccontextmanager
async def h1_rig(script):
    """A StaleServer running ``script`` behind the HTTP/1.1 driver; both closed at the end."""
    srv = await StaleServer(script).start()
    px = await _h1_proxy(srv)
    try:
        yield srv, px
    finally:
        px.close()
        srv.close()


@pytest.mark.parametrize("action", [CLOSE, RESET])
def test_h1_get_on_a_stale_reused_connection_is_retried_once_on_a_new_one(action):
    async def main():
        async with h1_rig(dies_on_second(action)) as (srv, px):
            got = await asyncio.to_thread(h1_session, px.port, [("GET", "/a", None), ("GET", "/b", None),
                                                                 ("GET", "/c", None)])
            assert [g[:2] for g in got] == [(200, expected(b"GET", b""))] * 3
            # /b went to connection 1 (which died), then to connection 2; /c reused connection 2
            assert [(c, n) for c, n, _, _ in srv.requests] == [(1, 1), (1, 2), (2, 1), (2, 2)]
            assert px.inputs.pool.dialed == 2 and srv.connections == 2
            assert retries(px.registry) == 1
            assert px.count("200") == 3 and px.count("503", "UC") == 0  # one observation per client request
    h1t.run(main())


def test_h1_retry_dials_anew_instead_of_taking_another_idle_connection():
    async def main():
        # two connections get busy together (both first requests held), then both idle in the
        # pool; each dies on its second request, as servers time out idle connections alike
        async with h1_rig(lambda conn, nth: ANSWER if conn > 2 else HOLD if nth == 1 else CLOSE) as (srv, px):
            first = await asyncio.gather(*(asyncio.to_thread(h1_session, px.port, [("GET", f"/warm{i}", None)])
                                           for i in range(2)))
            assert [g[0][0] for g in first] == [200, 200] and srv.connections == 2
            got = await asyncio.to_thread(h1_session, px.port, [("GET", "/b", None)])
            assert got[0][:2] == (200, expected(b"GET", b""))
            # the pool's newest idle connection died under /b; the retry went to a new (third)
            # connection, not to the other idle one (which would have died as well)
            assert [(c, n) for c, n, _, _ in srv.requests][2:] == [(2, 2), (3, 1)]
            assert px.inputs.pool.dialed == 3 and retries(px.registry) == 1
    h1t.run(main())


def test_h1_put_with_a_10k_body_is_replayed_identically():
    async def main():
        async with h1_rig(dies_on_second(CLOSE)) as (srv, px):
            body = os.urandom(10 * 1024)
            got = await asyncio.to_thread(h1_session, px.port, [("GET", "/a", None), ("PUT", "/b", body)])
            assert got[1][:2] == (200, expected(b"PUT", body))
            assert [(c, n, m) for c, n, m, _ in srv.requests] == [(1, 1, b"GET"), (1, 2, b"PUT"), (2, 1, b"PUT")]
            assert srv.requests[1][3] == body and srv.requests[2][3] == body
            assert px.inputs.pool.dialed == 2 and retries(px.registry) == 1
    h1t.run(main())


def test_h1_put_with_a_body_past_the_replay_buffer_is_not_retried():
    async def main():
        async with h1_rig(dies_on_second(CLOSE)) as (srv, px):
            body = os.urandom(70 * 1024)  # > RETRY_BUFFER (64 KiB)
            got = await asyncio.to_thread(h1_session, px.port, [("GET", "/a", None), ("PUT", "/b", body)])
            assert got[1][0] == 503 and got[1][2] == "UC"
            assert srv.connections == 1 and px.inputs.pool.dialed == 1 and retries(px.registry) == 0
    h1t.run(main())


def test_h1_post_on_a_stale_connection_is_not_retried():
    async def main():
        async with h1_rig(dies_on_second(CLOSE)) as (srv, px):
            got = await asyncio.to_thread(h1_session, px.port, [("GET", "/a", None), ("POST", "/b", b"x=1")])
            assert got[1][0] == 503 and got[1][2] == "UC"
            assert srv.connections == 1 and px.inputs.pool.dialed == 1
            assert [(c, n, m) for c, n, m, _ in srv.requests] == [(1, 1, b"GET"), (1, 2, b"POST")]
            assert retries(px.registry) == 0 and px.count("503", "UC") == 1
    h1t.run(main())


def test_h1_response_that_started_then_died_is_not_retried():
    async def main():
        async with h1_rig(dies_on_second(PARTIAL)) as (srv, px):
            r, w = await asyncio.open_connection(LO, px.port)
            w.write(b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n")
            first = await r.readuntil(b"\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 200")
            length = int(next(line for line in first.split(b"\r\n") if line.lower().startswith(b"content-length"))
                         .split(b":")[1])
            await r.readexactly(length)
            w.write(b"GET /b HTTP/1.1\r\nHost: web\r\n\r\n")
            rest, reset = b"", False
            try:
                rest = await asyncio.wait_for(r.read(-1), 10)
            except ConnectionResetError:
                reset = True  # the kernel may drop what the reset overtook
            w.close()
            # the head and part of the body went out, then the connection ended: never a whole reply
            assert reset or (rest.startswith(b"HTTP/1.1 200") and len(rest.partition(b"\r\n\r\n")[2]) < 100)
            assert srv.connections == 1 and px.inputs.pool.dialed == 1 and retries(px.registry) == 0
            assert [(c, n) for c, n, _, _ in srv.requests] == [(1, 1), (1, 2)]
    h1t.run(main())


def test_h1_fresh_connection_that_dies_is_not_retried():
    async def main():
        async with h1_rig(lambda conn, nth: CLOSE) as (srv, px):
            got = await asyncio.to_thread(h1_session, px.port, [("GET", "/a", None)])
            assert got[0][0] == 503 and got[0][2] == "UC"
            assert srv.connections == 1 and px.inputs.pool.dialed == 1 and retries(px.registry) == 0
    h1t.run(main())


def test_h1_retry_that_dies_again_is_503_uc():
    async def main():
        # connection 1 answers once then dies; every later connection dies on its first request
        async with h1_rig(lambda conn, nth: ANSWER if (conn, nth) == (1, 1) else CLOSE) as (srv, px):
            got = await asyncio.to_thread(h1_session, px.port, [("GET", "/a", None), ("GET", "/b", None)])
            assert got[1][0] == 503 and got[1][2] == "UC"
            assert srv.connections == 2 and px.inputs.pool.dialed == 2 and retries(px.registry) == 1
            assert px.count("503", "UC") == 1 and px.count("200") == 1
    h1t.run(main())


# ============================================================================ HTTP/2 client
async def _h2_proxy(server: StaleServer):
    return await h2t.Proxy(NodeSnapshot(h2t.NODE, (h2t.service("web", h2t.VIP, [server.endpoint()]),))).start()


@contextlib.asynccontextmanager
async def h2_rig(script):
    """A StaleServer running ``script`` behind the HTTP/2 driver and an HTTP/2 client; all closed at the end."""
    srv = await StaleServer(script).start()
    px = await _h2_proxy(srv)
    c = await h2t.H2Client.connect(px.port)
    try:
        yield srv, px, c
    finally:
        c.close()
        px.close()
        srv.close()


@pytest.mark.parametrize("action", [CLOSE, RESET])
def test_h2_get_on_a_stale_reused_http1_connection_is_retried_once(action):
    async def main():
        async with h2_rig(dies_on_second(action)) as (srv, px, c):
            for path in ("/a", "/b", "/c"):
                r = await c.get(path)
                assert (r.status, bytes(r.body), r.reset) == (200, expected(b"GET", b""), None)
            assert [(c_, n) for c_, n, _, _ in srv.requests] == [(1, 1), (1, 2), (2, 1), (2, 2)]
            assert px.inputs.pool.dialed == 2 and retries(px.registry) == 1
            assert px.count("200") == 3
    h1t.run(main())


def test_h2_put_with_a_10k_body_is_replayed_identically():
    async def main():
        async with h2_rig(dies_on_second(CLOSE)) as (srv, px, c):
            assert (await c.get("/a")).status == 200
            body = os.urandom(10 * 1024)
            r = await c.get("/b", method=b"PUT", body=body)
            assert (r.status, bytes(r.body)) == (200, expected(b"PUT", body))
            assert [(c_, n, m) for c_, n, m, _ in srv.requests] == [(1, 1, b"GET"), (1, 2, b"PUT"), (2, 1, b"PUT")]
            assert srv.requests[2][3] == body
            assert px.inputs.pool.dialed == 2 and retries(px.registry) == 1
    h1t.run(main())


def test_h2_post_on_a_stale_http1_connection_is_not_retried():
    async def main():
        async with h2_rig(dies_on_second(CLOSE)) as (srv, px, c):
            assert (await c.get("/a")).status == 200
            r = await c.get("/b", method=b"POST", body=b"x=1")
            assert r.status == 503 and r.headers.get(b"x-hostmesh-flags") == b"UC"
            assert srv.connections == 1 and px.inputs.pool.dialed == 1 and retries(px.registry) == 0
            assert px.count("503", "UC") == 1
    h1t.run(main())


def test_h2_response_that_started_then_died_is_not_retried():
    async def main():
        async with h2_rig(dies_on_second(PARTIAL)) as (srv, px, c):
            assert (await c.get("/a")).status == 200
            r = await c.get("/b")
            assert r.status == 200 and r.reset is not None  # the head went through, then the stream was reset
            assert srv.connections == 1 and px.inputs.pool.dialed == 1 and retries(px.registry) == 0
    h1t.run(main())


def test_h2_fresh_http1_connection_that_dies_is_not_retried():
    async def main():
        async with h2_rig(lambda conn, nth: RESET) as (srv, px, c):
            r = await c.get("/a")
            assert r.status == 503
            assert srv.connections == 1 and px.inputs.pool.dialed == 1 and retries(px.registry) == 0
            assert px.count("503", "UC") == 1
    h1t.run(main())
