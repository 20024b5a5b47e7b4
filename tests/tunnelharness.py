"""Two node proxies in one process, joined by the mTLS tunnel over loopback.

node-1 (the source) runs an ``OutboundProxy`` on 127.0.0.1; its client pod is 127.0.0.1
(the test's own connections). node-2 (the destination) runs an ``InboundProxy`` on
``POD_IP``:``tunnel_port``: with no capture, a connection dialed to the pod's tunnel port
lands right there and its original destination is the listener's own address, exactly
what capture would report. The pod's app listens on ``POD_IP``. ``tap`` puts a
forwarder between the two proxies that records every byte on the wire.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
from pathlib import Path

import uvloop
from prometheus_client import CollectorRegistry

from nodeagent.identity import spiffe_id
from nodeagent.proxy import InboundProxy, OutboundProxy, ProxyInputs, ProxyLimits
from nodeagent.proxy.l7.metrics import HttpMetrics
from nodeagent.proxy.tunnel import TunnelListener
from nodeagent.state import AgentState, NodeSnapshot, Workload
from nodeagent.telemetry import ProxyMetrics
from tests.test_proxy_relay import echo_handler as echo  # noqa: F401  (re-exported for the tunnel tests)
from tests.tlsfixtures import TD, FileIdentities, TestCA

NODE1, NODE2 = "node-1", "node-2"
CLIENT_IP = "127.0.0.1"
POD_IP = "127.0.0.2"
NODE_IP = "127.0.0.3"  # the node-addressed tunnel listener
OTHER_POD_IP = "127.0.0.4"  # another pod on node-2, running as another identity
CLIENT_ID = spiffe_id(TD, "apps", "client")
WEB_ID = spiffe_id(TD, "shop", "web")
DB_ID = spiffe_id(TD, "shop", "db")


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def free_port(host: str) -> int:
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def workloads(web_sa: str = "web") -> tuple[Workload, ...]:
    return (Workload("client", "apps", NODE1, CLIENT_IP, "client", (("app", "client"),)),
            Workload("web", "shop", NODE2, POD_IP, web_sa, (("app", "web"),)),
            Workload("db", "shop", NODE2, OTHER_POD_IP, "db", (("app", "db"),)))


def snapshot(node: str, *, web_sa: str = "web", config=(), services=()) -> NodeSnapshot:
    return NodeSnapshot(node=node, services=tuple(services), workloads=workloads(web_sa), config=tuple(config))


def metric(registry: CollectorRegistry, name: str, **labels) -> float:
    total = 0.0
    for family in registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


class Tap:
    """A byte-recording TCP forwarder between the two proxies."""

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        self.host = host
        self.target = target
        self.wire = bytearray()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        async def pump(r, w):
            try:
                while data := await r.read(65536):
                    self.wire += data
                    w.write(data)
                    await w.drain()
                if w.can_write_eof():
                    w.write_eof()
            except (ConnectionError, OSError):
                w.transport.abort()
        await asyncio.gather(pump(reader, uw), pump(ur, writer))
        writer.close()
        uw.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class Mesh:
    """node-1's outbound proxy, node-2's inbound proxy (+ tunnel listener), one test CA."""

    def __init__(self, *, web_sa_on_node2: str = "web", config=(), limits: ProxyLimits | None = None,
                 tap: bool = False, intermediate: bool = True, client_identity: bool = True,
                 services=(), l7: bool = False) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="hm-tunnel-")
        self.ca = TestCA(Path(self.tmp.name), intermediate=intermediate)
        self.ids1 = FileIdentities(self.ca.bundle)
        self.ids2 = FileIdentities(self.ca.bundle)
        if client_identity:
            self.ids1.add(CLIENT_ID, self.ca.leaf(CLIENT_ID))
        node2_web = spiffe_id(TD, "shop", web_sa_on_node2)
        self.ids2.add(node2_web, self.ca.leaf(node2_web))
        self.ids2.add(DB_ID, self.ca.leaf(DB_ID))
        self.limits = limits or ProxyLimits()
        self.tunnel_port = free_port(POD_IP)
        self.use_tap = tap
        self.tap: Tap | None = None
        self.dst: tuple[str, int] | None = None  # what node-1's client "dialed"
        self.inbound_dst: tuple[str, int] | None = None  # override node-2's original destination
        self.state1, self.state2 = AgentState(), AgentState()
        self.state1.apply(snapshot(NODE1, config=config, services=services))
        self.state2.apply(snapshot(NODE2, web_sa=web_sa_on_node2, config=config, services=services))
        self.l7 = l7  # node-1's outbound listener runs the L7 dispatch
        self.reg1, self.reg2 = CollectorRegistry(), CollectorRegistry()
        self.out: OutboundProxy | None = None
        self.inb: InboundProxy | None = None
        self.node_listener: TunnelListener | None = None

    async def __aenter__(self) -> "Mesh":
        inputs2 = ProxyInputs(state=self.state2, node=NODE2, metrics=ProxyMetrics(self.reg2), limits=self.limits,
                              original_destination=lambda sock: self.inbound_dst or sock.getsockname(),
                              identities=self.ids2, tunnel_port=self.tunnel_port)
        self.inb = InboundProxy(inputs2, POD_IP, self.tunnel_port)
        await self.inb.start()
        self.node_listener = TunnelListener(self.inb.tunnel, NODE_IP, 0)
        await self.node_listener.start()
        dial_port = self.tunnel_port
        if self.use_tap:
            self.tap = Tap(POD_IP, (POD_IP, self.tunnel_port))
            await self.tap.start()
            dial_port = self.tap.port
        inputs1 = ProxyInputs(state=self.state1, node=NODE1, metrics=ProxyMetrics(self.reg1), limits=self.limits,
                              original_destination=lambda sock: self.dst, identities=self.ids1,
                              tunnel_port=dial_port, http_metrics=HttpMetrics(self.reg1) if self.l7 else None)
        self.out = OutboundProxy(inputs1, CLIENT_IP, 0)
        await self.out.start()
        return self

    async def __aexit__(self, *exc) -> None:
        if self.tap is not None:
            self.tap.close()
        self.node_listener.close()
        await asyncio.gather(self.out.drain(0), self.inb.drain(0))
        self.tmp.cleanup()

    async def connect(self, dst: tuple[str, int]):
        self.dst = dst
        return await asyncio.open_connection(CLIENT_IP, self.out.port)

    async def settle(self, timeout: float = 20.0) -> None:
        """Both proxies hold no relayed connection."""
        async with asyncio.timeout(timeout):
            while self.out.active_connections or self.inb.active_connections:
                await asyncio.sleep(0.005)

    def m1(self, name: str, **labels) -> float:
        return metric(self.reg1, name, **labels)

    def m2(self, name: str, **labels) -> float:
        return metric(self.reg2, name, **labels)


async def start_app(handler, host: str = POD_IP):
    server = await asyncio.start_server(handler, host, 0)
    return server, server.sockets[0].getsockname()[1]


async def closed_by_peer(reader) -> bool:
    """True when the connection ends (EOF or reset) without any data arriving."""
    try:
        data = await asyncio.wait_for(reader.read(), 20)
    except (ConnectionResetError, BrokenPipeError):
        return True
    return data == b""
