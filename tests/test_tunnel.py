"""The mTLS tunnel end to end over loopback: real proxies, real TLS, a test CA.

See ``tests/tunnelharness.py`` for the two-node setup. No assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import ssl

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.identity import leaf_identity_der
from nodeagent.proxy import NodeProxy, ProxyInputs, ProxyLimits
from nodeagent.proxy import tunnel_wire as wire
from nodeagent.state import AgentState, ConfigObject
from nodeagent.telemetry import ProxyMetrics
from tests.tlsfixtures import TD, TestCA, client_context_for
from tests.tunnelharness import (CLIENT_ID, DB_ID, NODE_IP, OTHER_POD_IP, POD_IP, WEB_ID, Mesh, closed_by_peer,
                                 echo, run, start_app)

pytestmark = pytest.mark.timeout(120)

MARKER = b"PLAINTEXT-MARKER-7f3a"
CHUNK = 256 * 1024


def strict(ns: str = "shop") -> ConfigObject:
    return ConfigObject("PeerAuthentication", ns, "default", json.dumps({"mtls": {"mode": "STRICT"}}))


class Counting:
    """An app handler wrapper that counts the connections it was given."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.n = 0

    async def __call__(self, reader, writer):
        self.n += 1
        await self.handler(reader, writer)


def reset(writer) -> None:
    """Close with RST (SO_LINGER 0)."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    writer.transport.abort()


async def ask(m: Mesh, port: int, payload: bytes) -> bytes:
    r, w = await m.connect((POD_IP, port))
    w.write(payload)
    w.write_eof()
    data = await asyncio.wait_for(r.read(), 20)
    w.close()
    return data


# ------------------------------------------------------------------ the happy path

def test_cross_node_relay_is_mutual_tls_with_principals_on_both_sides():
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh() as m:
            assert await ask(m, port, b"hello mesh") == b"hello mesh"
            await m.settle()
            src = dict(reporter="source", source_workload="client", source_workload_namespace="apps",
                       source_principal=CLIENT_ID.uri, destination_workload="web", destination_workload_namespace="shop",
                       destination_principal=WEB_ID.uri, connection_security_policy="mutual_tls", response_flags="-")
            dst = dict(src, reporter="destination")
            assert m.m1("hostmesh_tcp_connections_closed_total", **src) == 1
            assert m.m1("hostmesh_tcp_received_bytes_total", **src) == 10
            assert m.m2("hostmesh_tcp_connections_closed_total", **dst) == 1
            assert m.m2("hostmesh_tcp_sent_bytes_total", **dst) == 10
            assert m.m1("hostmesh_agent_tunnel_handshakes_total", result="ok") == 1
            assert m.m2("hostmesh_agent_tunnel_handshakes_total", result="ok") == 1
    run(main())


def test_bytes_between_the_proxies_are_encrypted():
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh(tap=True) as m:
            payload = MARKER * 4096
            assert await ask(m, port, payload) == payload
            await m.settle()
            assert len(m.tap.wire) > 2 * len(payload)  # both directions crossed the tap
            assert MARKER not in bytes(m.tap.wire)
    run(main())


def test_several_mib_each_way_are_byte_identical():
    size = 6 << 20
    blocks = [hashlib.sha256(str(i).encode()).digest() * 2048 for i in range(48)]  # 64 KiB each

    async def main():
        got = {}

        async def handler(reader, writer):
            async def send():
                for i in range(size // len(blocks[0])):
                    writer.write(blocks[-1 - i % len(blocks)])
                    await writer.drain()
                writer.write_eof()
            task = asyncio.create_task(send())
            h, n = hashlib.sha256(), 0
            while data := await reader.read(1 << 20):
                h.update(data)
                n += len(data)
            got["server"] = (n, h.hexdigest())
            await task
            writer.close()

        app, port = await start_app(handler)
        async with app, Mesh() as m:
            r, w = await m.connect((POD_IP, port))
            want_up, want_down = hashlib.sha256(), hashlib.sha256()

            async def send():
                for i in range(size // len(blocks[0])):
                    b = blocks[i % len(blocks)]
                    want_up.update(b)
                    w.write(b)
                    await w.drain()
                w.write_eof()
            task = asyncio.create_task(send())
            h, n = hashlib.sha256(), 0
            while data := await r.read(1 << 20):
                h.update(data)
                n += len(data)
            await task
            for i in range(size // len(blocks[0])):
                want_down.update(blocks[-1 - i % len(blocks)])
            assert (n, h.hexdigest()) == (size, want_down.hexdigest())
            w.close()
            await m.settle()
            assert got["server"] == (size, want_up.hexdigest())
            assert m.m1("hostmesh_tcp_received_bytes_total") == size
            assert m.m2("hostmesh_tcp_sent_bytes_total") == size
    run(main())


def test_half_close_client_first_reply_after_eof():
    reply = os.urandom(2 << 20)

    async def main():
        async def handler(reader, writer):
            request = await reader.read()  # until the client's EOF crossed the tunnel
            writer.write(hashlib.sha256(request).digest() + reply)
            await writer.drain()
            writer.close()

        app, port = await start_app(handler)
        async with app, Mesh() as m:
            request = os.urandom(1 << 20)
            assert await ask(m, port, request) == hashlib.sha256(request).digest() + reply
            await m.settle()
            assert m.m1("hostmesh_tcp_connections_closed_total", response_flags="-") == 1
    run(main())


def test_half_close_server_first_client_keeps_sending():
    async def main():
        got = asyncio.get_running_loop().create_future()

        async def handler(reader, writer):
            writer.write(b"banner")
            writer.write_eof()
            got.set_result(await reader.read())
            writer.close()

        app, port = await start_app(handler)
        async with app, Mesh() as m:
            r, w = await m.connect((POD_IP, port))
            assert await asyncio.wait_for(r.read(), 20) == b"banner"
            w.write(b"after the server's EOF")
            w.write_eof()
            assert await asyncio.wait_for(got, 20) == b"after the server's EOF"
            w.close()
            await m.settle()
    run(main())


def test_backpressure_slow_client_bounds_buffers_on_both_proxies():
    total = 24 << 20
    high = 64 * 1024
    block = os.urandom(1 << 16)

    async def main():
        sent = {"n": 0}

        async def handler(reader, writer):
            try:
                while sent["n"] < total:
                    writer.write(block)
                    sent["n"] += len(block)
                    await writer.drain()
                writer.write_eof()
            except ConnectionError:
                pass
            writer.close()

        app, port = await start_app(handler)
        async with app, Mesh(limits=ProxyLimits(write_buffer_high=high)) as m:
            r, w = await m.connect((POD_IP, port))
            assert await r.readexactly(1) == block[:1]
            last, stable = -1, 0
            async with asyncio.timeout(30):
                while stable < 20:
                    await asyncio.sleep(0.01)
                    stable = stable + 1 if sent["n"] == last else 0
                    last = sent["n"]
            assert sent["n"] < total  # the stall reached the app through both proxies
            (out_relay,) = m.out.connections
            (in_relay,) = m.inb.connections
            for relay in (out_relay, in_relay):
                assert max(relay.write_buffer_sizes()) <= high + 2 * CHUNK
            assert not in_relay.up.transport.is_reading()  # node-2 stopped reading the app
            h, n = hashlib.sha256(block[:1]), 1
            while data := await r.read(1 << 16):
                h.update(data)
                n += len(data)
            assert n == total and h.hexdigest() == hashlib.sha256(block * (total // len(block))).hexdigest()
            w.close()
            await m.settle()
    run(main())


# ------------------------------------------------------------------ reuse

def test_sequential_connections_reuse_one_tunnel_connection():
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh() as m:
            for i in range(6):
                assert await ask(m, port, b"n%d" % i) == b"n%d" % i
                await m.settle()
            assert m.m1("hostmesh_agent_tunnel_handshakes_total") == 1
            assert m.m2("hostmesh_agent_tunnel_handshakes_total") == 1
            assert m.m1("hostmesh_agent_tunnel_streams_total", connection="reused") == 5
            assert m.m2("hostmesh_agent_tunnel_streams_total", connection="reused") == 5
            assert m.m1("hostmesh_agent_tunnel_pool_idle") == 1
    run(main())


def test_a_stream_the_server_ended_first_leaves_a_reusable_connection():
    async def main():
        async def banner(reader, writer):
            writer.write(b"banner")
            writer.write_eof()
            await reader.read()
            writer.close()

        app, port = await start_app(banner)
        async with app, Mesh() as m:
            for _ in range(3):
                r, w = await m.connect((POD_IP, port))
                assert await asyncio.wait_for(r.read(), 20) == b"banner"
                w.write_eof()
                w.close()
                await m.settle()
            assert m.m1("hostmesh_agent_tunnel_handshakes_total") == 1
            assert m.m1("hostmesh_agent_tunnel_streams_total", connection="reused") == 2
    run(main())


def test_drain_deadline_resets_tunnelled_connections_on_both_nodes():
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh() as m:
            r, w = await m.connect((POD_IP, port))
            w.write(b"hold")
            assert await r.readexactly(4) == b"hold"
            assert await m.out.drain(0.2) == 1
            assert await closed_by_peer(r)
            w.close()
            await m.settle()
            assert m.m2("hostmesh_tcp_connections_closed_total", response_flags="DC") == 1
    run(main())


def test_concurrent_connections_each_get_a_tunnel_connection_then_are_pooled_up_to_the_cap():
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh(limits=ProxyLimits(tunnel_pool_max_idle=3)) as m:
            results = await asyncio.gather(*(ask(m, port, b"c%d" % i * 1000) for i in range(8)))
            assert results == [b"c%d" % i * 1000 for i in range(8)]
            await m.settle()
            assert m.m1("hostmesh_agent_tunnel_handshakes_total", result="ok") == 8
            assert m.m1("hostmesh_agent_tunnel_pool_idle") == 3
            assert await ask(m, port, b"again") == b"again"
            assert m.m1("hostmesh_agent_tunnel_handshakes_total") == 8
    run(main())


def test_rotated_certificate_is_not_served_by_old_pooled_connections():
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh() as m:
            assert await ask(m, port, b"one") == b"one"
            await m.settle()
            m.ids1.add(CLIENT_ID, m.ca.leaf(CLIENT_ID))  # rotation: a new context from now on
            assert await ask(m, port, b"two") == b"two"
            assert m.m1("hostmesh_agent_tunnel_handshakes_total", result="ok") == 2
    run(main())


# ------------------------------------------------------------------ fail closed, source side

def test_no_client_certificate_refuses_instead_of_plaintext():
    async def main():
        counting = Counting(echo)
        app, port = await start_app(counting)
        async with app, Mesh(client_identity=False) as m:
            r, w = await m.connect((POD_IP, port))
            w.write(b"secret")
            assert await closed_by_peer(r)
            w.close()
            await m.settle()
            assert counting.n == 0
            assert m.m1("hostmesh_agent_connections_rejected_total", reason="no_client_certificate") == 1
            assert m.m1("hostmesh_tcp_connections_closed_total", response_flags="UF",
                        connection_security_policy="mutual_tls") == 1
            assert m.m2("hostmesh_agent_tunnel_handshakes_total") == 0
    run(main())


def test_expired_certificate_is_refused_even_with_a_pooled_connection():
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh() as m:
            assert await ask(m, port, b"ok") == b"ok"
            await m.settle()
            m.ids1.remove(CLIENT_ID)  # the manager says: no valid certificate any more
            r, w = await m.connect((POD_IP, port))
            assert await closed_by_peer(r)
            w.close()
            assert m.m1("hostmesh_agent_connections_rejected_total", reason="no_client_certificate") == 1
    run(main())


def test_server_presenting_another_identity_is_refused_by_the_client():
    async def main():
        counting = Counting(echo)
        app, port = await start_app(counting)
        # node-2 believes the pod runs as shop/impostor and presents that; node-1 expects shop/web
        async with app, Mesh(web_sa_on_node2="impostor") as m:
            r, w = await m.connect((POD_IP, port))
            w.write(b"secret")
            assert await closed_by_peer(r)
            w.close()
            await m.settle()
            assert counting.n == 0
            assert m.m1("hostmesh_agent_tunnel_handshakes_total", result="identity_mismatch") == 1
            assert m.m1("hostmesh_agent_connections_terminated_total", reason="tls_identity_mismatch") == 1
            assert m.m1("hostmesh_tcp_connections_closed_total", response_flags="UF") == 1
    run(main())


def test_destination_connect_failure_is_reported_as_uf_at_the_source():
    async def main():
        app, port = await start_app(echo)
        app.close()
        await app.wait_closed()
        async with Mesh() as m:
            r, w = await m.connect((POD_IP, port))
            assert await closed_by_peer(r)
            w.close()
            await m.settle()
            assert m.m1("hostmesh_agent_connections_terminated_total", reason="tunnel_peer_connect_failed") == 1
            assert m.m1("hostmesh_tcp_connections_closed_total", response_flags="UF") == 1
            assert m.m2("hostmesh_agent_connections_terminated_total", reason="connect_refused") == 1
    run(main())


def test_resets_cross_the_tunnel_both_ways():
    async def main():
        outcome = asyncio.get_running_loop().create_future()

        async def resetting(reader, writer):
            data = await reader.readexactly(4)
            if data == b"rst!":
                reset(writer)
                return
            try:
                await reader.read()
                outcome.set_result("eof")
            except ConnectionResetError:
                outcome.set_result("reset")

        app, port = await start_app(resetting)
        async with app, Mesh() as m:
            r, w = await m.connect((POD_IP, port))
            w.write(b"rst!")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(), 20)
            w.close()
            await m.settle()
            assert m.m1("hostmesh_tcp_connections_closed_total", response_flags="UC") == 1
            r, w = await m.connect((POD_IP, port))
            w.write(b"keep")
            await w.drain()
            async with asyncio.timeout(20):
                while not m.inb.connections or next(iter(m.inb.connections)).up.transport is None:
                    await asyncio.sleep(0.005)
            reset(w)
            assert await asyncio.wait_for(outcome, 20) == "reset"
            await m.settle()
    run(main())


def test_non_mesh_source_keeps_the_plaintext_path():
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh() as m:
            m.dst = (POD_IP, port)
            r, w = await asyncio.open_connection("127.0.0.1", m.out.port, local_addr=("127.0.0.5", 0))
            w.write(b"plain")
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 20) == b"plain"
            w.close()
            await m.settle()
            assert m.m1("hostmesh_tcp_connections_closed_total", connection_security_policy="none") == 1
            assert m.m1("hostmesh_agent_tunnel_handshakes_total") == 0
    run(main())


# ------------------------------------------------------------------ PeerAuthentication

def test_strict_refuses_plaintext_inbound_and_accepts_the_tunnel():
    async def main():
        counting = Counting(echo)
        app, port = await start_app(counting)
        async with app, Mesh(config=[strict()]) as m:
            m.inbound_dst = (POD_IP, port)  # plaintext captured into the inbound listener
            r, w = await asyncio.open_connection(POD_IP, m.inb.port)
            w.write(b"plaintext")
            assert await closed_by_peer(r)
            w.close()
            assert counting.n == 0
            assert m.m2("hostmesh_agent_connections_rejected_total", reason="mtls_required") == 1
            assert m.m2("hostmesh_tcp_connections_closed_total", response_flags="NR",
                        connection_security_policy="none") == 1
            m.inbound_dst = None
            assert await ask(m, port, b"mtls") == b"mtls"
            assert counting.n == 1
    run(main())


def test_permissive_accepts_plaintext_inbound():
    async def main():
        app, port = await start_app(echo)
        permissive = ConfigObject("PeerAuthentication", "shop", "default", json.dumps({"mtls": {"mode": "PERMISSIVE"}}))
        async with app, Mesh(config=[permissive]) as m:
            m.inbound_dst = (POD_IP, port)
            r, w = await asyncio.open_connection(POD_IP, m.inb.port)
            w.write(b"plaintext")
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 20) == b"plaintext"
            w.close()
            await m.settle()
            assert m.m2("hostmesh_tcp_connections_closed_total", connection_security_policy="none",
                        response_flags="-") == 1
    run(main())


# ------------------------------------------------------------------ fail closed, destination side

async def raw_tunnel(host: str, port: int, context: ssl.SSLContext, sni: str | None, frames: bytes):
    """A hand-made tunnel client: TLS, then ``frames``; returns (peer identity, what came back)
    or raises the handshake error."""
    r, w = await asyncio.open_connection(host, port, ssl=context, server_hostname=sni or "")
    der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
    w.write(frames)
    rx = wire.FrameReceiver(wire.CLIENT)
    rx.start_stream()
    data = b""
    try:
        async with asyncio.timeout(20):
            # until the stream ends (the server keeps an idle connection open) or the connection does
            while chunk := await r.read(65536):
                data += chunk
                try:
                    kinds = [k for k, _ in rx.feed(chunk)]
                except wire.TunnelProtocolError:
                    break
                if wire.EOF in kinds or wire.RESET in kinds:
                    break
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        data = data or None
    w.close()
    return leaf_identity_der(der, TD), data


def open_frames(port: int, payload: bytes, ip: str = POD_IP) -> bytes:
    return wire.encode_open(ip, port, "127.0.0.1") + wire.data_frames(payload) + wire.EOF_FRAME


@pytest.mark.parametrize("kind", ["other_trust_domain", "expired", "wrong_san", "two_uri_sans", "ca_true",
                                  "untrusted_ca", "no_certificate"])
def test_bad_client_certificates_are_refused(kind, tmp_path):
    async def main():
        counting = Counting(echo)
        app, port = await start_app(counting)
        async with app, Mesh() as m:
            if kind == "untrusted_ca":
                rogue = TestCA(tmp_path / "rogue")
                issued = rogue.leaf(CLIENT_ID)
            elif kind == "no_certificate":
                issued = None
            else:
                issued = m.ca.bad_leaves()[kind]
            ctx = client_context_for(issued, m.ca.bundle)
            try:
                _, data = await raw_tunnel(POD_IP, m.tunnel_port, ctx, None, open_frames(port, MARKER))
            except (ssl.SSLError, ConnectionError):
                data = None  # refused during the handshake
            assert not data
            await m.settle()
            assert counting.n == 0
            refused = (m.m2("hostmesh_agent_tunnel_handshakes_total", result="failed")
                       + m.m2("hostmesh_agent_tunnel_handshakes_total", result="client_rejected"))
            assert refused == 1
            assert m.m2("hostmesh_agent_tunnel_handshakes_total", result="ok") == 0
    run(main())


def test_a_good_hand_made_client_gets_through_so_the_refusals_above_mean_something():
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh() as m:
            ctx = client_context_for(m.ca.leaf(CLIENT_ID), m.ca.bundle)
            peer, data = await raw_tunnel(POD_IP, m.tunnel_port, ctx, None, open_frames(port, b"hi"))
            assert peer == WEB_ID
            assert data == wire.data_frames(b"hi") + wire.EOF_FRAME
    run(main())


def test_node_addressed_listener_chooses_the_certificate_by_sni():
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh() as m:
            ctx = client_context_for(m.ca.leaf(CLIENT_ID), m.ca.bundle)
            listener = (NODE_IP, m.node_listener.port)
            peer, data = await raw_tunnel(*listener, ctx, wire.sni_for(WEB_ID), open_frames(port, b"via sni"))
            assert peer == WEB_ID and data == wire.data_frames(b"via sni") + wire.EOF_FRAME
            # a connection presenting db may not reach web
            peer, data = await raw_tunnel(*listener, ctx, wire.sni_for(DB_ID), open_frames(port, b"x"))
            assert peer == DB_ID and data == wire.encode_reset(wire.RESET_NOT_ALLOWED)
            assert m.m2("hostmesh_agent_connections_rejected_total", reason="tunnel_target_runs_as_another_identity") == 1
            # an identity this node does not run: no certificate, no handshake
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await raw_tunnel(*listener, ctx, "nobody.shop.serviceaccount.identity.cluster.local", b"")
            with pytest.raises((ssl.SSLError, ConnectionError)):  # no SNI: nothing to choose by
                await raw_tunnel(*listener, ctx, None, b"")
            assert m.m2("hostmesh_agent_tunnel_handshakes_total", result="failed") == 2
    run(main())


def test_stream_for_a_pod_other_than_the_captured_one_is_refused():
    async def main():
        app, port = await start_app(echo, host=OTHER_POD_IP)
        async with app, Mesh() as m:
            ctx = client_context_for(m.ca.leaf(CLIENT_ID), m.ca.bundle)
            # captured for web's IP, so it presents web; it asks for db's pod
            peer, data = await raw_tunnel(POD_IP, m.tunnel_port, ctx, None, open_frames(port, b"x", OTHER_POD_IP))
            assert peer == WEB_ID and data == wire.encode_reset(wire.RESET_NOT_ALLOWED)
    run(main())


def test_garbage_inside_tls_is_a_protocol_error():
    async def main():
        async with Mesh() as m:
            ctx = client_context_for(m.ca.leaf(CLIENT_ID), m.ca.bundle)
            _, data = await raw_tunnel(POD_IP, m.tunnel_port, ctx, None, b"GET / HTTP/1.1\r\n\r\n")
            assert data == wire.encode_reset(wire.RESET_PROTOCOL_ERROR)
            assert m.m2("hostmesh_agent_connections_terminated_total", reason="tunnel_protocol_error") == 1
    run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_openssl_s_client_without_a_client_certificate_is_refused():
    async def main():
        async with Mesh(intermediate=False) as m:  # s_client -cert sends the leaf only
            async def s_client(*extra: str) -> tuple[int, str]:
                proc = await asyncio.create_subprocess_exec(
                    "openssl", "s_client", "-connect", f"{NODE_IP}:{m.node_listener.port}",
                    "-servername", wire.sni_for(WEB_ID), "-CAfile", str(m.ca.bundle), "-verify_return_error", "-ign_eof",
                    *extra, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT)
                out, _ = await asyncio.wait_for(proc.communicate(wire.EOF_FRAME), 30)
                return proc.returncode, out.decode(errors="replace")
            code, out = await s_client()
            # TLS 1.3: the client finishes first, then the server fails the handshake and closes
            # (asyncio's and uvloop's TLS layers drop the alert), so s_client sees the close
            # (or a reset, when its bytes arrived after the server had given up)
            assert code != 0, out
            assert any(why in out for why in ("certificate required", "unexpected eof", "errno=104")), out
            assert m.m2("hostmesh_agent_tunnel_handshakes_total", result="failed") == 1
            assert m.m2("hostmesh_agent_tunnel_handshakes_total", result="ok") == 0
            leaf = m.ca.leaf(CLIENT_ID)  # the same command with a certificate gets a session
            code, out = await s_client("-cert", str(leaf.chain), "-key", str(leaf.key))
            assert "Verify return code: 0 (ok)" in out, out
            assert m.m2("hostmesh_agent_tunnel_handshakes_total", result="ok") == 1
    run(main())


# ------------------------------------------------------------------ lifecycle

def test_node_proxy_runs_the_tunnel_listener_and_drain_closes_pooled_connections():
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh() as m:
            assert await ask(m, port, b"pooled") == b"pooled"
            await m.settle()
            (conn,) = m.out.tunnel.pool[next(iter(m.out.tunnel.pool))]
            assert await m.out.drain(5) == 0
            async with asyncio.timeout(20):
                while not conn.lost:
                    await asyncio.sleep(0.005)
            assert m.out.tunnel.idle_count() == 0
        inputs = ProxyInputs(state=AgentState(), node="node-2", metrics=ProxyMetrics(CollectorRegistry()),
                             identities=m.ids2)
        proxy = NodeProxy(inputs, host="127.0.0.1", outbound_port=0, inbound_port=0, tunnel_port=0)
        servers = await proxy.start()
        assert len(servers) == 3 and proxy.tunnel.port not in (0, proxy.inbound.port, proxy.outbound.port)
        assert await proxy.drain(5) == 0
    run(main())


def test_a_draining_server_sends_goaway_and_the_client_stops_reusing_the_connection():
    """Closing an idle pooled connection outright races with a client reusing it; GOAWAY
    does not: the client drops it from its pool and closes it, and the server's drain
    waits for that instead of cutting it."""
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh() as m:
            assert await ask(m, port, b"pooled") == b"pooled"
            await m.settle()
            (conn,) = m.out.tunnel.pool[next(iter(m.out.tunnel.pool))]
            (served,) = m.inb.tunnel.connections
            m.inb.tunnel.draining = True
            m.inb.tunnel.close_idle()
            assert served.goaway_sent
            async with asyncio.timeout(20):
                while not conn.lost or not served.lost:
                    await asyncio.sleep(0.005)
            assert m.out.tunnel.idle_count() == 0
            # (a successor would take new connections; here the same server does again)
            m.inb.tunnel.draining = False
            # the next connection makes a new tunnel connection, and a stream on a connection
            # that got GOAWAY mid-stream still completes
            r, w = await m.connect((POD_IP, port))
            w.write(b"first")
            assert await asyncio.wait_for(r.readexactly(5), 20) == b"first"
            (busy,) = [c for c in m.inb.tunnel.connections if not c.lost]
            m.inb.tunnel.close_idle()
            await asyncio.sleep(0.05)
            w.write(b"second")
            assert await asyncio.wait_for(r.readexactly(6), 20) == b"second"
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 20) == b""
            w.close()
            async with asyncio.timeout(20):
                while not busy.lost:
                    await asyncio.sleep(0.005)
            assert m.out.tunnel.idle_count() == 0
            assert m.m1("hostmesh_agent_tunnel_handshakes_total") == 2
    run(main())


def test_an_open_that_crossed_the_goaway_is_served():
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh() as m:
            assert await ask(m, port, b"pooled") == b"pooled"
            await m.settle()
            m.inb.tunnel.draining = True
            m.inb.draining = True  # what drain() sets: no new connections, but this stream is served
            (served,) = m.inb.tunnel.connections
            served.goaway_sent = True  # the GOAWAY is "in flight": the client has not seen it
            assert await ask(m, port, b"crossed") == b"crossed"
    run(main())


def test_the_tunnel_also_works_on_the_default_asyncio_loop():
    async def main():
        app, port = await start_app(echo)
        async with app, Mesh() as m:
            assert await ask(m, port, b"asyncio") == b"asyncio"
            assert m.m2("hostmesh_agent_tunnel_handshakes_total", result="ok") == 1
    asyncio.run(main())


def test_without_identities_nothing_changes():
    inputs = ProxyInputs(state=AgentState(), node="node-1", metrics=ProxyMetrics(CollectorRegistry()))
    proxy = NodeProxy(inputs)
    assert proxy.tunnel is None and proxy.outbound.tunnel is None and proxy.inbound.tunnel is None


def test_invalid_tunnel_settings_are_rejected():
    metrics = ProxyMetrics(CollectorRegistry())
    with pytest.raises(ValueError, match="tunnel_port"):
        ProxyInputs(state=AgentState(), node="n", metrics=metrics, tunnel_port=70000)
    with pytest.raises(ValueError, match="tunnel_pool_idle_timeout"):
        ProxyLimits(tunnel_pool_idle_timeout=0)
    with pytest.raises(ValueError, match="tunnel_pool_max_idle"):
        ProxyLimits(tunnel_pool_max_idle=-1)
