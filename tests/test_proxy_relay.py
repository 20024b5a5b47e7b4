"""The L4 relay with real sockets on 127.0.0.1, under uvloop as in production.

There is no iptables here: each proxy gets an injected ``original_destination`` that
returns the address the test wants the client to have "dialed" (a service VIP from the
snapshot, whose endpoints are local backends). No assertion depends on timing; waits
have generous upper bounds only so that a bug fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from nodeagent.errors import ProxyError
from nodeagent.proxy import InboundProxy, NodeProxy, OutboundProxy, ProxyInputs, ProxyLimits
from nodeagent.state import AgentState, Endpoint, NodeSnapshot, Service, ServicePort, Workload
from nodeagent.telemetry import ProxyMetrics

pytestmark = pytest.mark.timeout(120)

NODE = "node-1"
VIP = "198.19.0.10"  # never dialed: only looked up in the snapshot
LO = "127.0.0.1"
CHUNK = 256 * 1024  # largest single read (uvloop 250 000 B, asyncio 256 KiB): the most one chunk adds past the high mark


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def service_snapshot(*ports: int, vip: str = VIP, workloads=()) -> NodeSnapshot:
    eps = tuple(Endpoint(LO, p, NODE, f"backend-{i}", "shop") for i, p in enumerate(ports))
    svc = Service("web", "shop", vip, (ServicePort(80, ports[0] if ports else 8080),), eps)
    return NodeSnapshot(node=NODE, services=(svc,), workloads=tuple(workloads))


class Proxy:
    """An outbound (or inbound) listener on 127.0.0.1:0 with its own registry."""

    def __init__(self, snapshot: NodeSnapshot | None, *, dst=(VIP, 80), cls=OutboundProxy, **kw):
        self.state = AgentState()
        if snapshot is not None:
            self.state.apply(snapshot)
        self.registry = CollectorRegistry()
        self.metrics = ProxyMetrics(self.registry)
        self.dst = dst
        limits = kw.pop("limits", ProxyLimits())
        origdst = kw.pop("original_destination", lambda sock: self.dst)
        self.inputs = ProxyInputs(state=self.state, node=NODE, metrics=self.metrics, limits=limits,
                                  original_destination=origdst, **kw)
        self.listener = cls(self.inputs, LO, 0)

    async def __aenter__(self):
        await self.listener.start()
        return self

    async def __aexit__(self, *exc):
        await self.listener.drain(0)

    @property
    def port(self) -> int:
        return self.listener.port

    async def connect(self):
        return await asyncio.open_connection(LO, self.port)

    async def settle(self, active: int = 0, timeout: float = 20.0) -> None:
        """Wait until the listener holds exactly ``active`` connections."""
        async with asyncio.timeout(timeout):
            while self.listener.active_connections != active:
                await asyncio.sleep(0.005)

    def metric(self, name: str, **labels) -> float:
        total = 0.0
        for family in self.registry.collect():
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total


async def start_server(handler, backlog: int = 1024):
    server = await asyncio.start_server(handler, LO, 0, backlog=backlog)
    return server, server.sockets[0].getsockname()[1]


async def echo_handler(reader, writer):
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def read_all(reader) -> bytes:
    return await reader.read()


async def closed_by_peer(reader) -> bool:
    """True when the connection ends (EOF or reset) without any data arriving."""
    try:
        data = await asyncio.wait_for(reader.read(), 20)
    except ConnectionResetError:
        return True
    return data == b""


def free_port() -> int:
    s = socket.socket()
    s.bind((LO, 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------------- basics

def test_echo_round_trip_and_metrics():
    async def main():
        server, port = await start_server(echo_handler)
        client_wl = Workload("client", "apps", NODE, LO)
        async with server, Proxy(service_snapshot(port, workloads=[client_wl])) as p:
            r, w = await p.connect()
            w.write(b"hello mesh")
            await w.drain()
            assert await r.readexactly(10) == b"hello mesh"
            w.write(b"!" * 1000)
            w.write_eof()
            assert await read_all(r) == b"!" * 1000
            w.close()
            await p.settle(0)
            labels = dict(reporter="source", source_workload="client", source_workload_namespace="apps",
                          destination_service="web.shop.svc.cluster.local", destination_workload="backend-0",
                          destination_workload_namespace="shop", request_protocol="tcp", response_flags="-",
                          connection_security_policy="none")
            assert p.metric("hostmesh_tcp_connections_opened_total", **labels) == 1
            assert p.metric("hostmesh_tcp_connections_closed_total", **labels) == 1
            assert p.metric("hostmesh_tcp_received_bytes_total", **labels) == 1010
            assert p.metric("hostmesh_tcp_sent_bytes_total", **labels) == 1010
            assert p.metric("hostmesh_agent_tcp_connections_active", direction="outbound") == 0
    run(main())


def test_64_mib_each_way_is_byte_identical():
    size = 64 << 20
    blocks = [hashlib.sha256(str(i).encode()).digest() * 4096 for i in range(64)]  # 64 x 128 KiB, distinct
    up_blocks = blocks[::-1]

    async def main():
        got = {}

        async def handler(reader, writer):
            async def send():
                for _ in range(size // (len(up_blocks) * len(up_blocks[0]))):
                    for b in up_blocks:
                        writer.write(b)
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

        server, port = await start_server(handler)
        async with server, Proxy(service_snapshot(port)) as p:
            r, w = await p.connect()
            want_up, want_down = hashlib.sha256(), hashlib.sha256()

            async def send():
                for _ in range(size // (len(blocks) * len(blocks[0]))):
                    for b in blocks:
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
            for _ in range(size // (len(up_blocks) * len(up_blocks[0]))):
                for b in up_blocks:
                    want_down.update(b)
            assert n == size and h.hexdigest() == want_down.hexdigest()
            w.close()
            await p.settle(0)
            assert got["server"] == (size, want_up.hexdigest())
            assert p.metric("hostmesh_tcp_received_bytes_total") == size
            assert p.metric("hostmesh_tcp_sent_bytes_total") == size
    run(main())


def test_half_close_client_still_reads_reply_sent_after_eof():
    reply = os.urandom(3 << 20)

    async def main():
        async def handler(reader, writer):
            request = await reader.read()  # until the client's EOF
            writer.write(hashlib.sha256(request).digest() + reply)
            await writer.drain()
            writer.close()

        server, port = await start_server(handler)
        async with server, Proxy(service_snapshot(port)) as p:
            r, w = await p.connect()
            request = os.urandom(1 << 20)
            w.write(request)
            w.write_eof()  # shutdown(SHUT_WR)
            data = await read_all(r)
            assert data == hashlib.sha256(request).digest() + reply
            w.close()
            await p.settle(0)
            assert p.metric("hostmesh_tcp_connections_closed_total", response_flags="-") == 1
    run(main())


def test_half_close_server_first_client_keeps_sending():
    async def main():
        got = asyncio.get_running_loop().create_future()

        async def handler(reader, writer):
            writer.write(b"banner")
            writer.write_eof()  # server done talking, still listening
            got.set_result(await reader.read())
            writer.close()

        server, port = await start_server(handler)
        async with server, Proxy(service_snapshot(port)) as p:
            r, w = await p.connect()
            assert await read_all(r) == b"banner"  # EOF propagated to the client
            w.write(b"after the server's EOF")
            w.write_eof()
            assert await asyncio.wait_for(got, 20) == b"after the server's EOF"
            w.close()
            await p.settle(0)
    run(main())


def test_client_eof_before_upstream_connects_is_propagated():
    async def main():
        async def handler(reader, writer):
            writer.write(b"saw:" + await reader.read())
            await writer.drain()
            writer.close()

        server, port = await start_server(handler)
        async with server, Proxy(service_snapshot(port)) as p:
            s = socket.create_connection((LO, p.port))
            s.sendall(b"early bytes")
            s.shutdown(socket.SHUT_WR)  # data + EOF before the proxy dialed anything
            s.setblocking(False)
            loop = asyncio.get_running_loop()
            data = b""
            while chunk := await loop.sock_recv(s, 65536):
                data += chunk
            s.close()
            assert data == b"saw:early bytes"
            await p.settle(0)
    run(main())


def test_tcp_nodelay_on_both_sides():
    async def main():
        server, port = await start_server(echo_handler)
        async with server, Proxy(service_snapshot(port)) as p:
            r, w = await p.connect()
            w.write(b"x")
            await r.readexactly(1)
            (relay,) = p.listener.connections
            down = relay.transport.get_extra_info("socket")
            up = relay.up.transport.get_extra_info("socket")
            assert down.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert up.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            w.close()
    run(main())


# ----------------------------------------------------------------- backpressure

def test_backpressure_slow_reader_keeps_proxy_buffers_bounded():
    total = 48 << 20
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

        server, port = await start_server(handler)
        limits = ProxyLimits(write_buffer_high=high)
        async with server, Proxy(service_snapshot(port), limits=limits) as p:
            r, w = await p.connect()
            assert await r.readexactly(1) == block[:1]
            (relay,) = p.listener.connections
            # the client stops reading: wait until the server cannot send any more
            last, stable = -1, 0
            async with asyncio.timeout(30):
                while stable < 20:
                    await asyncio.sleep(0.01)
                    stable = stable + 1 if sent["n"] == last else 0
                    last = sent["n"]
                    assert max(relay.write_buffer_sizes()) <= high + CHUNK
            assert sent["n"] < total  # the stall reached the server: nothing unbounded in between
            down_buf, _ = relay.write_buffer_sizes()
            assert down_buf <= high + CHUNK
            assert not relay.up.transport.is_reading()  # the proxy stopped reading the server
            # now read everything, checking the bound all the way
            h = hashlib.sha256(block[:1])
            n = 1
            while data := await r.read(1 << 16):
                h.update(data)
                n += len(data)
                if not relay.torn_down:
                    assert max(relay.write_buffer_sizes()) <= high + CHUNK
            assert n == total
            assert h.hexdigest() == hashlib.sha256(block * (total // len(block))).hexdigest()
            w.close()
            await p.settle(0)
    run(main())


def test_backpressure_fast_client_slow_server():
    high = 64 * 1024
    total = 16 << 20

    async def main():
        gate = asyncio.Event()
        got = {"n": 0}

        async def handler(reader, writer):
            await gate.wait()  # not reading: the client's bytes pile up upstream
            while data := await reader.read(1 << 16):
                got["n"] += len(data)
            writer.close()

        server, port = await start_server(handler)
        async with server, Proxy(service_snapshot(port), limits=ProxyLimits(write_buffer_high=high)) as p:
            r, w = await p.connect()
            block = b"u" * (1 << 16)
            sent = 0

            async def send():
                nonlocal sent
                while sent < total:
                    w.write(block)
                    sent += len(block)
                    await w.drain()
                w.write_eof()
            task = asyncio.create_task(send())
            last, stable = -1, 0
            async with asyncio.timeout(30):
                while stable < 20:
                    await asyncio.sleep(0.01)
                    stable = stable + 1 if sent == last else 0
                    last = sent
            (relay,) = p.listener.connections
            assert sent < total
            _, up_buf = relay.write_buffer_sizes()
            assert up_buf <= high + CHUNK
            assert not relay.transport.is_reading()
            gate.set()
            await task
            await read_all(r)
            w.close()
            await p.settle(0)
            assert got["n"] == total
    run(main())


# -------------------------------------------------------------- failures

def test_connect_timeout_closes_client_and_counts_uf():
    async def main():
        blackhole = socket.socket()
        blackhole.bind((LO, 0))
        blackhole.listen(0)  # never accepts; one queued connection fills the backlog
        filler = socket.create_connection(blackhole.getsockname(), timeout=5)
        snap = service_snapshot(blackhole.getsockname()[1])
        try:
            async with Proxy(snap, limits=ProxyLimits(connect_timeout=0.3)) as p:
                r, w = await p.connect()
                w.write(b"anyone?")
                assert await closed_by_peer(r)
                w.close()
                await p.settle(0)
                assert p.metric("hostmesh_tcp_connections_closed_total", response_flags="UF") == 1
                assert p.metric("hostmesh_agent_connections_terminated_total", direction="outbound",
                                reason="connect_timeout") == 1
                assert p.metric("hostmesh_tcp_received_bytes_total") == 7  # read, never delivered
        finally:
            filler.close()
            blackhole.close()
    run(main())


def test_refused_upstream_resets_client():
    async def main():
        async with Proxy(service_snapshot(free_port())) as p:
            r, w = await p.connect()
            assert await closed_by_peer(r)
            w.close()
            await p.settle(0)
            assert p.metric("hostmesh_tcp_connections_closed_total", response_flags="UF") == 1
            assert p.metric("hostmesh_agent_connections_terminated_total", reason="connect_refused") == 1
    run(main())


def test_upstream_reset_is_propagated_as_reset():
    async def main():
        async def handler(reader, writer):
            await reader.readexactly(4)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            writer.transport.abort()  # RST

        server, port = await start_server(handler)
        async with server, Proxy(service_snapshot(port)) as p:
            r, w = await p.connect()
            w.write(b"ping")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(), 20)
            w.close()
            await p.settle(0)
            assert p.metric("hostmesh_tcp_connections_closed_total", response_flags="UC") == 1
            assert p.metric("hostmesh_agent_connections_terminated_total", reason="upstream_reset") == 1
    run(main())


def test_downstream_reset_is_propagated_upstream():
    async def main():
        outcome = asyncio.get_running_loop().create_future()

        async def handler(reader, writer):
            try:
                await reader.read()
                outcome.set_result("eof")
            except ConnectionResetError:
                outcome.set_result("reset")

        server, port = await start_server(handler)
        async with server, Proxy(service_snapshot(port)) as p:
            r, w = await p.connect()
            w.write(b"ping")
            await w.drain()
            await p.settle(1)
            (relay,) = p.listener.connections
            async with asyncio.timeout(20):
                while relay.up is None or relay.up.transport is None:
                    await asyncio.sleep(0.005)
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            w.transport.abort()
            assert await asyncio.wait_for(outcome, 20) == "reset"
            await p.settle(0)
            assert p.metric("hostmesh_tcp_connections_closed_total", response_flags="DC") == 1
    run(main())


def test_service_without_endpoints_is_refused_uh():
    async def main():
        snap = NodeSnapshot(node=NODE, services=(Service("web", "shop", VIP, (ServicePort(80, 8080),), ()),))
        async with Proxy(snap) as p:
            r, w = await p.connect()
            assert await closed_by_peer(r)
            w.close()
            await p.settle(0)
            assert p.metric("hostmesh_tcp_connections_opened_total", response_flags="UH",
                            destination_service="web.shop.svc.cluster.local") == 1
            assert p.metric("hostmesh_tcp_connections_closed_total", response_flags="UH") == 1
            assert p.metric("hostmesh_agent_connections_rejected_total", reason="no_healthy_upstream") == 1
    run(main())


def test_unknown_destination_passthrough_and_refuse():
    async def main():
        server, port = await start_server(echo_handler)
        async with server:
            async with Proxy(NodeSnapshot(node=NODE), dst=(LO, port)) as p:
                r, w = await p.connect()
                w.write(b"through")
                w.write_eof()
                assert await read_all(r) == b"through"
                w.close()
                await p.settle(0)
                assert p.metric("hostmesh_tcp_connections_closed_total", destination_service="unknown",
                                response_flags="-") == 1
            async with Proxy(NodeSnapshot(node=NODE), dst=(LO, port), unknown_destination="refuse") as p:
                r, w = await p.connect()
                assert await closed_by_peer(r)
                w.close()
                await p.settle(0)
                assert p.metric("hostmesh_tcp_connections_closed_total", response_flags="NR") == 1
                assert p.metric("hostmesh_agent_connections_rejected_total", reason="no_route") == 1
    run(main())


def test_no_snapshot_yet_passes_through():
    async def main():
        server, port = await start_server(echo_handler)
        async with server, Proxy(None, dst=(LO, port)) as p:
            r, w = await p.connect()
            w.write(b"x")
            w.write_eof()
            assert await read_all(r) == b"x"
            w.close()
    run(main())


def test_unredirected_connection_is_refused_with_real_so_original_dst():
    from nodeagent.capture.origdst import so_original_dst as original_destination

    async def main():
        async with Proxy(service_snapshot(free_port()), original_destination=original_destination) as p:
            r, w = await p.connect()  # not NATed: SO_ORIGINAL_DST fails with ENOENT
            assert await closed_by_peer(r)
            w.close()
            await p.settle(0)
            assert p.metric("hostmesh_agent_connections_rejected_total", reason="no_original_destination") == 1
    run(main())


def test_original_destination_of_the_proxy_itself_is_a_loop():
    async def main():
        p = Proxy(service_snapshot(free_port()))
        async with p:
            p.dst = (LO, p.port)
            r, w = await p.connect()
            assert await closed_by_peer(r)
            w.close()
            await p.settle(0)
            assert p.metric("hostmesh_agent_connections_rejected_total", reason="proxy_loop") == 1
    run(main())


# ------------------------------------------------------------------ timeouts

def test_idle_timeout_closes_both_sides():
    async def main():
        upstream_closed = asyncio.get_running_loop().create_future()

        async def handler(reader, writer):
            writer.write(await reader.readexactly(5))
            await reader.read()  # returns when the proxy closes the upstream side
            upstream_closed.set_result(True)
            writer.close()

        server, port = await start_server(handler)
        limits = ProxyLimits(idle_timeout=0.4, stats_flush_interval=0.05)
        async with server, Proxy(service_snapshot(port), limits=limits) as p:
            r, w = await p.connect()
            w.write(b"hello")
            assert await r.readexactly(5) == b"hello"
            assert await closed_by_peer(r)  # then silence: the proxy gives up
            assert await asyncio.wait_for(upstream_closed, 20)
            w.close()
            await p.settle(0)
            assert p.metric("hostmesh_agent_connections_terminated_total", reason="idle_timeout") == 1
            assert p.metric("hostmesh_tcp_received_bytes_total") == 5
            assert p.metric("hostmesh_tcp_sent_bytes_total") == 5
    run(main())


def test_periodic_flush_publishes_bytes_of_open_connections():
    async def main():
        server, port = await start_server(echo_handler)
        limits = ProxyLimits(stats_flush_interval=0.02)
        async with server, Proxy(service_snapshot(port), limits=limits) as p:
            r, w = await p.connect()
            w.write(b"x" * 100)
            await r.readexactly(100)
            async with asyncio.timeout(20):
                while p.metric("hostmesh_tcp_sent_bytes_total") != 100:
                    await asyncio.sleep(0.01)
            assert p.metric("hostmesh_tcp_received_bytes_total") == 100
            assert p.metric("hostmesh_tcp_connections_closed_total") == 0
            w.write_eof()
            await read_all(r)
            w.close()
            await p.settle(0)
            assert p.metric("hostmesh_tcp_sent_bytes_total") == 100  # not counted twice
    run(main())


# ------------------------------------------------------------------ limits & scale

def test_connection_limit_rejects_new_connections():
    async def main():
        server, port = await start_server(echo_handler)
        async with server, Proxy(service_snapshot(port), limits=ProxyLimits(max_connections=2)) as p:
            conns = []
            for _ in range(2):
                r, w = await p.connect()
                w.write(b"ok")
                assert await r.readexactly(2) == b"ok"
                conns.append((r, w))
            r3, w3 = await p.connect()
            assert await closed_by_peer(r3)
            w3.close()
            assert p.metric("hostmesh_agent_connections_rejected_total", direction="outbound",
                            reason="connection_limit") == 1
            assert p.listener.active_connections == 2
            for r, w in conns:  # the admitted ones are unaffected
                w.write(b"still")
                assert await r.readexactly(5) == b"still"
                w.close()
            await p.settle(0)
            r4, w4 = await p.connect()  # room again
            w4.write(b"again")
            assert await r4.readexactly(5) == b"again"
            w4.close()
    run(main())


def test_500_concurrent_connections_all_complete():
    n = 500

    async def main():
        server, port = await start_server(echo_handler, backlog=n)
        async with server, Proxy(service_snapshot(port)) as p:
            async def one(i: int) -> bool:
                r, w = await p.connect()
                payload = (b"%d:" % i) * 2000
                w.write(payload)
                w.write_eof()
                ok = await read_all(r) == payload
                w.close()
                return ok
            results = await asyncio.gather(*(one(i) for i in range(n)))
            assert all(results)
            await p.settle(0)
            expected = sum(len(b"%d:" % i) * 2000 for i in range(n))
            assert p.metric("hostmesh_tcp_connections_opened_total") == n
            assert p.metric("hostmesh_tcp_connections_closed_total", response_flags="-") == n
            assert p.metric("hostmesh_tcp_received_bytes_total") == expected
            assert p.metric("hostmesh_tcp_sent_bytes_total") == expected
    run(main())


def test_round_robin_through_the_proxy_and_snapshot_swap():
    async def main():
        def tagged(tag: bytes):
            async def handler(reader, writer):
                writer.write(tag + await reader.read())
                await writer.drain()
                writer.close()
            return handler

        a, pa = await start_server(tagged(b"A"))
        b, pb = await start_server(tagged(b"B"))
        c, pc = await start_server(tagged(b"C"))
        async with a, b, c, Proxy(service_snapshot(pa, pb)) as p:
            async def ask(msg: bytes = b"") -> bytes:
                r, w = await p.connect()
                w.write(msg)
                w.write_eof()
                data = await read_all(r)
                w.close()
                return data
            assert [await ask() for _ in range(4)] == [b"A", b"B", b"A", b"B"]
            # a connection in flight keeps the decision it made before the swap
            r, w = await p.connect()
            w.write(b"-old")
            await p.settle(1)
            (relay,) = p.listener.connections
            async with asyncio.timeout(20):
                while relay.up is None or relay.up.transport is None:
                    await asyncio.sleep(0.005)
            p.state.apply(service_snapshot(pc))
            w.write_eof()
            assert await read_all(r) == b"A-old"
            w.close()
            assert await ask() == b"C"
    run(main())


def test_inbound_forwards_to_local_workload_only():
    async def main():
        server, port = await start_server(echo_handler)
        local = Workload("web-a", "shop", NODE, LO)
        remote = Workload("web-b", "shop", "node-2", "127.0.0.2")
        snap = NodeSnapshot(node=NODE, workloads=(local, remote))
        async with server, Proxy(snap, dst=(LO, port), cls=InboundProxy) as p:
            r, w = await p.connect()
            w.write(b"in")
            w.write_eof()
            assert await read_all(r) == b"in"
            w.close()
            await p.settle(0)
            assert p.metric("hostmesh_tcp_connections_closed_total", reporter="destination",
                            destination_workload="web-a", source_workload="web-a", response_flags="-") == 1
            p.dst = ("127.0.0.2", port)
            r, w = await p.connect()
            assert await closed_by_peer(r)
            w.close()
            await p.settle(0)
            assert p.metric("hostmesh_agent_connections_rejected_total", direction="inbound",
                            reason="not_local_workload") == 1
            assert p.metric("hostmesh_tcp_connections_closed_total", response_flags="NR") == 1
    run(main())


# ----------------------------------------------------------------- lifecycle

def test_listen_on_busy_port_is_a_clear_error():
    async def main():
        busy = socket.socket()
        busy.bind((LO, 0))
        busy.listen()
        port = busy.getsockname()[1]
        try:
            p = Proxy(NodeSnapshot(node=NODE))
            p.listener.port = port
            with pytest.raises(ProxyError, match=rf"cannot listen on 127\.0\.0\.1:{port}: address already in use"):
                await p.listener.start()
        finally:
            busy.close()
    run(main())


def test_drain_waits_for_connections_then_aborts_the_rest():
    async def main():
        server, port = await start_server(echo_handler)
        async with server:
            p = Proxy(service_snapshot(port))
            await p.listener.start()
            r1, w1 = await p.connect()   # finishes during the grace period
            r2, w2 = await p.connect()   # never finishes: aborted at the deadline
            for r, w in ((r1, w1), (r2, w2)):
                w.write(b"hi")
                assert await r.readexactly(2) == b"hi"
            drain = asyncio.create_task(p.listener.drain(1.0))
            await asyncio.sleep(0)
            with pytest.raises(OSError):  # no longer accepting
                await asyncio.open_connection(LO, p.port)
            w1.write_eof()
            assert await read_all(r1) == b""
            w1.close()
            assert await drain == 1
            assert p.listener.active_connections == 0
            assert await closed_by_peer(r2)
            w2.close()
            assert p.metric("hostmesh_agent_connections_terminated_total", reason="drain") == 1
    run(main())


def test_node_proxy_starts_both_listeners_and_drains_quickly_when_idle():
    async def main():
        state = AgentState()
        inputs = ProxyInputs(state=state, node=NODE, metrics=ProxyMetrics(CollectorRegistry()))
        proxy = NodeProxy(inputs, host=LO, outbound_port=0, inbound_port=0)
        servers = await proxy.start()
        assert len(servers) == 2
        assert proxy.outbound.port and proxy.inbound.port and proxy.outbound.port != proxy.inbound.port
        assert proxy.active_connections == 0
        assert await proxy.drain(5) == 0
    run(main())


def test_socket_mark_is_set_on_upstream_sockets():
    if not hasattr(socket, "SO_MARK"):
        pytest.skip("no SO_MARK on this platform")
    mark = 0x7E57

    async def main():
        server, port = await start_server(echo_handler)
        async with server, Proxy(service_snapshot(port), socket_mark=mark) as p:
            r, w = await p.connect()
            w.write(b"m")
            await r.readexactly(1)
            (relay,) = p.listener.connections
            assert relay.up.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == mark
            w.close()

    probe = socket.socket()
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except PermissionError:
        pytest.skip("SO_MARK needs CAP_NET_ADMIN")
    finally:
        probe.close()
    run(main())


def test_socket_mark_without_privilege_fails_at_start():
    code = ("from nodeagent.proxy.listener import check_socket_mark\n"
            "from nodeagent.errors import ProxyError\n"
            "try:\n    check_socket_mark(0x7e57)\nexcept ProxyError as e:\n    print(e)\n")
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set=-net_admin,-net_raw", sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-c", code]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
    except FileNotFoundError:
        pytest.skip("setpriv not available to drop CAP_NET_ADMIN")
    if out.returncode != 0 and "setpriv" in out.stderr:
        pytest.skip(f"cannot drop capabilities here: {out.stderr.strip()}")
    assert "SO_MARK needs CAP_NET_ADMIN" in out.stdout, out.stdout + out.stderr


def test_invalid_inputs_are_rejected():
    metrics = ProxyMetrics(CollectorRegistry())
    with pytest.raises(ValueError, match="unknown_destination"):
        ProxyInputs(state=AgentState(), node=NODE, metrics=metrics, unknown_destination="drop")
    with pytest.raises(ValueError, match="socket_mark"):
        ProxyInputs(state=AgentState(), node=NODE, metrics=metrics, socket_mark=-1)
    with pytest.raises(ValueError, match="connect_timeout"):
        ProxyLimits(connect_timeout=0)
    with pytest.raises(ValueError, match="max_connections"):
        ProxyLimits(max_connections=0)


def test_a_bug_in_the_decision_path_does_not_leak_the_connection():
    async def main():
        async with Proxy(service_snapshot(free_port())) as p:
            def broken(*args):
                raise KeyError("bug")
            p.listener.decide = broken
            r, w = await p.connect()
            assert await closed_by_peer(r)
            w.close()
            await p.settle(0)
    run(main())


def test_client_leaving_while_upstream_connects_cancels_the_dial():
    async def main():
        blackhole = socket.socket()
        blackhole.bind((LO, 0))
        blackhole.listen(0)
        filler = socket.create_connection(blackhole.getsockname(), timeout=5)
        try:
            async with Proxy(service_snapshot(blackhole.getsockname()[1]),
                             limits=ProxyLimits(connect_timeout=60)) as p:
                r, w = await p.connect()
                await p.settle(1)
                (relay,) = p.listener.connections
                # gives up (reset) long before the connect timeout; a FIN would be a half-close
                # that must wait for the upstream to carry it
                w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                w.transport.abort()
                await p.settle(0)
                assert relay._task.done() and relay.u_done
                assert p.metric("hostmesh_agent_connections_terminated_total", reason="connect_timeout") == 0
                assert p.metric("hostmesh_tcp_connections_closed_total", response_flags="DC") == 1
        finally:
            filler.close()
            blackhole.close()
    run(main())
