"""Interop smoke tests: the HTTP/2 server codec under a tiny test-only asyncio driver, hit by
real clients (nghttp, h2load, curl, grpcio) on loopback. Skipped when a client is missing."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from nodeagent.proxy.l7 import http2

pytestmark = pytest.mark.timeout(60)


class EchoProtocol(asyncio.Protocol):
    """Test driver: answers every request once its body ended (gRPC: echoes the message;
    path /slow: the proxy's deadline reply; else 200 with the path and body size)."""

    def __init__(self) -> None:
        self.conn = http2.ServerConnection()
        self.bodies: dict[int, int] = {}
        self.grpc: dict[int, bytearray] = {}
        self.heads: dict[int, http2.RequestHead] = {}

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        for ev in conn.receive_data(data):
            if isinstance(ev, http2.RequestHead):
                self.heads[ev.stream_id] = ev
                self.bodies[ev.stream_id] = 0
                if ev.grpc:
                    self.grpc[ev.stream_id] = bytearray()
            elif isinstance(ev, http2.Data):
                self.bodies[ev.stream_id] += len(ev.data)
                if ev.stream_id in self.grpc:
                    self.grpc[ev.stream_id] += ev.data
                self.transport.write(conn.consumed(ev.stream_id, len(ev.data)))
            elif isinstance(ev, http2.EndOfMessage):
                self.transport.write(self.respond(ev.stream_id))
        self.transport.write(conn.data_to_send())
        if conn.closed:
            self.transport.close()

    def respond(self, sid: int) -> bytes:
        conn = self.conn
        head = self.heads.pop(sid)
        if head.path == b"/pkg.Echo/Slow":
            return conn.send_local_reply(sid, "UT")
        if head.grpc:
            out = conn.send_response(sid, 200, [(b"content-type", b"application/grpc")])
            out += conn.send_data(sid, bytes(self.grpc.pop(sid)))
            return out + conn.send_end(sid, [(b"grpc-status", b"0")])
        body = b"%s %d\n" % (head.path, self.bodies.pop(sid))
        out = conn.send_response(sid, 200, [(b"content-type", b"text/plain"),
                                            (b"content-length", b"%d" % len(body))])
        return out + conn.send_data(sid, body, end_stream=True)


async def serve():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode("utf-8", "replace")


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (apt install nghttp2-client curl)")


def against_server(check) -> None:
    """Run ``await check(port)`` with the echo server listening on loopback."""
    async def main():
        server, port = await serve()
        try:
            await check(port)
        finally:
            server.close()
            await server.wait_closed()
    asyncio.run(main())


def test_nghttp_get_and_post():
    need("nghttp")

    async def check(port):
        rc, out = await run("nghttp", "-v", f"http://127.0.0.1:{port}/hello")
        assert rc == 0, out
        assert "/hello 0" in out and ":status: 200" in out
        rc, out = await run("nghttp", "-v", "-d", "/etc/hostname", f"http://127.0.0.1:{port}/up")
        assert rc == 0, out
        assert "/up " in out and "END_STREAM" in out
    against_server(check)


def test_h2load_multiplexed():
    need("h2load")

    async def check(port):
        rc, out = await run("h2load", "-n", "200", "-c", "2", "-m", "10", f"http://127.0.0.1:{port}/")
        assert rc == 0, out
        assert "200 succeeded" in out, out
    against_server(check)


def test_curl_prior_knowledge_upload():
    need("curl")

    async def check(port):
        # /bin/sh is larger than the initial 64 KiB windows: the upload needs our WINDOW_UPDATEs
        rc, out = await run("curl", "-sS", "--http2-prior-knowledge", "--data-binary", "@/bin/sh",
                            f"http://127.0.0.1:{port}/big")
        assert rc == 0, out
        assert out.strip() == "/big %d" % os.path.getsize("/bin/sh")
    against_server(check)


def test_grpcio_unary_streaming_and_deadline():
    grpc = pytest.importorskip("grpc")

    def client(port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            echo = ch.unary_unary("/pkg.Echo/Say")
            assert echo(b"ping", timeout=10) == b"ping"
            # streaming calls: the echo answers once the client's stream ended
            msgs = [b"a", b"bb" * 1000, b"c" * 100_000]  # larger than the 64 KiB initial windows
            assert list(ch.stream_stream("/pkg.Echo/Bidi")(iter(msgs), timeout=10)) == msgs
            assert ch.stream_unary("/pkg.Echo/Up")(iter(msgs[:1]), timeout=10) == msgs[0]
            assert list(ch.unary_stream("/pkg.Echo/Down")(b"x", timeout=10)) == [b"x"]
            slow = ch.unary_unary("/pkg.Echo/Slow")
            with pytest.raises(grpc.RpcError) as ei:
                slow(b"x", timeout=10)
            return ei.value.code(), ei.value.details()

    async def check(port):
        code, details = await asyncio.get_running_loop().run_in_executor(None, client, port)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "upstream request timeout"
    against_server(check)
