"""The accept side shared by the outbound and inbound listeners.

A listener owns a listening socket it creates itself (SO_REUSEADDR, backlog 4096), a
``loop.create_server(..., sock=...)`` server whose protocol is ``relay.Relay``, the set
of its live connections, and the per-listener decision state (``Destinations``).

On accept (``admit``): connection limit -> original destination (injected function;
iptables REDIRECT's SO_ORIGINAL_DST by default) -> the snapshot current *now*, kept by
the connection -> ``intercept`` (the inbound side takes tunnel connections here) ->
decision -> ``Relay.refuse`` or ``dispatch`` (plaintext ``Relay.forward`` by default; the
outbound side may detect the protocol and hand HTTP to an L7 driver (``l7dispatch``) or
tunnel, the inbound side enforces PeerAuthentication STRICT). No
module-level mutable state: everything comes from one ``ProxyInputs``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from nodeagent.errors import ProxyError
from nodeagent.proxy.destinations import (PASSTHROUGH, UNKNOWN_DESTINATION_POLICIES, Decision,
                                          Destinations, Refuse, connection_labels)
from nodeagent.capture.origdst import so_original_dst
from nodeagent.identity import WorkloadIdentities
from nodeagent.proxy.authz import ConnectionAttrs
from nodeagent.proxy.relay import Relay
from nodeagent.proxy.tunnel_plan import TUNNEL_PORT
from nodeagent.state import AgentState, NodeSnapshot
from nodeagent.telemetry import ProxyMetrics, TcpLabels

if TYPE_CHECKING:  # pragma: no cover
    from nodeagent.accesslog import AccessLog
    from nodeagent.proxy.l7.metrics import HttpMetrics

log = logging.getLogger(__name__)

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006


@dataclass(frozen=True)
class ProxyLimits:
    """Per-listener limits, each with a safe default."""

    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0  # 0 disables (not recommended)
    max_connections: int = 10000  # per listener
    write_buffer_high: int = 256 * 1024  # per transport; low water = high / 4
    backlog: int = 4096
    # how often long connections publish their byte counters (also bounds idle-check lateness)
    stats_flush_interval: float = 30.0
    # protocol detection (outbound, ports with an L7 need but no appProtocol): how long to wait
    # for the client's first bytes before treating the connection as TCP (server-speaks-first);
    # > 0: nothing else bounds a connection that is still being detected
    detect_timeout: float = 1.0
    # mTLS tunnel: idle pooled connections per (source, destination, address), how long they
    # stay pooled, the age after which one is not reused, how long a server keeps an idle one
    # (longer than the client's, so a client rarely reuses what the server is closing)
    tunnel_pool_max_idle: int = 16
    tunnel_pool_idle_timeout: float = 15.0
    tunnel_max_age: float = 300.0
    tunnel_server_idle_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "stats_flush_interval", "detect_timeout", "tunnel_pool_idle_timeout",
                     "tunnel_max_age", "tunnel_server_idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ProxyLimits.{name}: must be > 0, got {getattr(self, name)!r}")
        if self.idle_timeout < 0:
            raise ValueError(f"ProxyLimits.idle_timeout: must be >= 0, got {self.idle_timeout!r}")
        if self.tunnel_pool_max_idle < 0:
            raise ValueError(f"ProxyLimits.tunnel_pool_max_idle: must be >= 0, got {self.tunnel_pool_max_idle!r}")
        for name in ("max_connections", "write_buffer_high", "backlog"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"ProxyLimits.{name}: must be >= 1, got {getattr(self, name)!r}")

    @property
    def write_buffer_low(self) -> int:
        return self.write_buffer_high // 4

    @property
    def tick_interval(self) -> float:
        if self.idle_timeout:
            return min(self.stats_flush_interval, self.idle_timeout / 4)
        return self.stats_flush_interval


@dataclass
class ProxyInputs:
    """Everything a proxy listener needs, passed in (no globals)."""

    state: AgentState
    node: str
    metrics: ProxyMetrics
    limits: ProxyLimits = field(default_factory=ProxyLimits)
    socket_mark: int = 0  # SO_MARK on upstream sockets; 0 = don't set (needs CAP_NET_ADMIN)
    unknown_destination: str = PASSTHROUGH  # "passthrough" | "refuse" (outbound)
    # accepted socket -> (ip, port) the client dialed; the capture backend provides it
    original_destination: Callable[[socket.socket], tuple[str, int]] = so_original_dst
    # workload certificates (the certificate manager); None: no mTLS, plaintext only
    identities: WorkloadIdentities | None = None
    # the port tunnel connections are dialed at (a pod IP's, captured into 15006) and the
    # node-addressed tunnel listener's
    tunnel_port: int = TUNNEL_PORT
    # request metrics on the agent's registry; None: no L7 (every connection is relayed as TCP)
    http_metrics: "HttpMetrics | None" = None
    # RequestAuthentication keys of jwksUri rules (jwks.JwksCache.keys); the default has
    # none, so tokens of such issuers are refused until the agent fetched their keys
    jwks_keys: Callable[[str], Any] = lambda uri: None
    # this process's share of each local rate limit (1 / the proxy worker processes)
    rate_limit_share: float = 1.0
    # JSON access log lines (nodeagent/accesslog.py); None: never. It switches the listeners'
    # and the L7 inputs' own ``access_log`` on and off with the snapshot (AccessLog.attach)
    access_log: "AccessLog | None" = None

    def __post_init__(self) -> None:
        if isinstance(self.tunnel_port, bool) or not isinstance(self.tunnel_port, int) \
                or not 0 < self.tunnel_port < 65536:
            raise ValueError(f"tunnel_port: must be a port (1-65535), got {self.tunnel_port!r}")
        if self.unknown_destination not in UNKNOWN_DESTINATION_POLICIES:
            raise ValueError(f"unknown_destination: must be one of {', '.join(UNKNOWN_DESTINATION_POLICIES)}, "
                             f"got {self.unknown_destination!r}")
        if not isinstance(self.socket_mark, int) or not 0 <= self.socket_mark <= 0xFFFFFFFF:
            raise ValueError(f"socket_mark: must be a 32-bit unsigned integer, got {self.socket_mark!r}")


def listen_socket(host: str, port: int, backlog: int, *, reuseport: bool = False) -> socket.socket:
    """A bound, listening, non-blocking TCP socket; failures become a clear ProxyError.

    ``reuseport``: SO_REUSEPORT, so that more sockets can join the port later (workers,
    or a successor with more workers). A port someone else holds still fails: it is probed
    first with a plain bind (SO_REUSEPORT alone would let us share another root process's
    port without a word)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if reuseport and port:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))  # EADDRINUSE here if anyone holds the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            why = "address already in use"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            why = "permission denied"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = "address not available on this host"
        else:
            why = exc.strerror or str(exc)
        raise ProxyError(f"cannot listen on {host}:{port}: {why}") from None
    return sock


async def serve_sockets(loop: asyncio.AbstractEventLoop, factory, socks, bind, backlog: int
                        ) -> tuple[list[asyncio.AbstractServer], list[socket.socket]]:
    """A server per listening socket (``socks``: one, a list, or None: ``bind()`` one)."""
    if socks is None:
        socks = [bind()]
    elif isinstance(socks, socket.socket):
        socks = [socks]
    servers: list[asyncio.AbstractServer] = []
    try:
        for sock in socks:
            servers.append(await loop.create_server(factory, sock=sock, backlog=backlog))
    except BaseException:
        for server in servers:
            server.close()
        for sock in socks:
            sock.close()
        raise
    return servers, list(socks)


def check_socket_mark(mark: int) -> None:
    """Fail at startup, not per connection, when SO_MARK cannot be set."""
    if not mark:
        return
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except PermissionError:
        raise ProxyError(f"cannot set socket mark {mark:#x} on upstream sockets: SO_MARK needs "
                         "CAP_NET_ADMIN or CAP_NET_RAW (grant it to the agent, or set the socket mark to 0 when "
                         "the capture backend does not rely on it)") from None
    except OSError as exc:
        raise ProxyError(f"cannot set socket mark {mark:#x} on upstream sockets: {exc.strerror or exc}") from None
    finally:
        probe.close()


class ProxyListener:
    """Base of OutboundProxy and InboundProxy; subclasses implement ``decide``."""

    direction = ""  # "outbound" | "inbound": the metrics' direction label
    reporter = ""  # Istio reporter label: "source" | "destination"

    def __init__(self, inputs: ProxyInputs, host: str, port: int) -> None:
        self.inputs = inputs
        self.host = host
        self.port = port
        self.limits = inputs.limits
        self.metrics = inputs.metrics
        self.socket_mark = inputs.socket_mark
        self.original_destination = inputs.original_destination
        self.tick_interval = inputs.limits.tick_interval
        self.destinations = Destinations(inputs.node, unknown_destination=inputs.unknown_destination)
        self.connections: set[Relay] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: asyncio.AbstractServer | None = None
        self.sock: socket.socket | None = None  # the first listening socket
        self.servers: list[asyncio.AbstractServer] = []
        self.socks: list[socket.socket] = []  # every listening socket of the port, for a hand-off
        self.draining = False
        self.nodelay_by_loop = False  # uvloop sets TCP_NODELAY on accepted sockets itself
        self._empty: asyncio.Event | None = None
        self._no_snapshot = NodeSnapshot(node=inputs.node)
        self.metrics.track_active(self.direction, self.__len__)
        # the access log while the snapshot asks for lines, else None (relayed connections' lines)
        self.access_log: "AccessLog | None" = None
        if inputs.access_log is not None:
            inputs.access_log.attach(self)

    # --------------------------------------------------------------- lifecycle
    async def start(self, socks: "socket.socket | list[socket.socket] | None" = None) -> asyncio.AbstractServer:
        """Bind and start accepting, or accept on ``socks`` (listening sockets of one port,
        handed over by the previous agent or by the agent to a worker: every one is served,
        so no queued connection is left behind). Raises ProxyError with a clear message."""
        if self.server is not None:
            raise ProxyError(f"{self.direction} listener already started on {self.host}:{self.port}")
        check_socket_mark(self.socket_mark)
        self.loop = asyncio.get_running_loop()
        self.nodelay_by_loop = type(self.loop).__module__.startswith("uvloop")
        self.servers, self.socks = await serve_sockets(
            self.loop, lambda: Relay(self), socks, lambda: listen_socket(self.host, self.port, self.limits.backlog,
                                                                         reuseport=True), self.limits.backlog)
        self.server, self.sock = self.servers[0], self.socks[0]
        self.port = self.sock.getsockname()[1]  # the real port when asked for 0
        log.info("%s listener on %s:%d", self.direction, self.host, self.port)
        return self.server

    def stop_accepting(self) -> None:
        """Close the listening sockets (a successor that took them over keeps accepting)."""
        self.draining = True
        for server in self.servers:
            server.close()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __len__(self) -> int:
        return len(self.connections)

    @property
    def active_connections(self) -> int:
        return len(self.connections)

    async def drain(self, grace: float) -> int:
        """Stop accepting, let connections finish for up to ``grace`` seconds, abort the rest.

        Returns the number of connections aborted at the deadline.
        """
        self.draining = True
        for server in self.servers:
            server.close()
        for relay in list(self.connections):
            if relay.driver is not None:  # L7: close when idle, else after the current response
                relay.driver.drain()
        aborted = 0
        if self.connections:
            self._empty = asyncio.Event()
            try:
                await asyncio.wait_for(self._empty.wait(), grace)
            except TimeoutError:
                aborted = len(self.connections)
                for relay in list(self.connections):
                    relay.abort("drain")
                # aborts complete on the next loop iterations (connection_lost callbacks)
                try:
                    await asyncio.wait_for(self._empty.wait(), 5.0)
                except TimeoutError:
                    log.warning("%s listener: %d connections still closing after drain",
                                self.direction, len(self.connections))
        if self.server is not None and not self.connections:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 5.0)
            except TimeoutError:
                pass
        return aborted

    def close(self) -> None:
        """Stop accepting and abort every connection now."""
        self.draining = True
        for server in self.servers:
            server.close()
        for relay in list(self.connections):
            relay.abort("drain")

    # ------------------------------------------------------------ per connection
    def decide(self, snapshot: NodeSnapshot, dst_ip: str, dst_port: int) -> Decision:  # pragma: no cover
        raise NotImplementedError

    def recheck_authz(self, snapshot: NodeSnapshot) -> int:
        """Policies changed: close the relayed (L4) connections to local workloads that the
        new policies deny — or that now need their requests checked, which a relayed
        connection cannot have — as ztunnel does; connections served by an L7 driver are
        checked per request already. Returns how many were closed."""
        authz = getattr(self, "authz", None)
        if authz is None:
            return 0
        closed = 0
        for relay in list(self.connections):
            key = relay.authz_key
            if key is None or relay.driver is not None or relay.torn_down:
                continue
            address, port, principal, src_ip = key
            workload = snapshot.workload_by_ip(address)
            d = authz.authorizer.decide(snapshot, workload, ConnectionAttrs(principal, src_ip, address, port)) \
                if workload is not None else None
            if d is not None and d.allowed:
                continue
            if d is not None:
                authz.count(d, workload, principal, src_ip, port)
            relay.abort("authz_revoked")
            closed += 1
        if closed:
            log.info("%s: closed %d connection(s) the changed AuthorizationPolicies no longer allow",
                     self.direction, closed)
        return closed

    def admit(self, relay: Relay) -> None:
        """Called from Relay.connection_made: decide what happens to a new connection."""
        if self.draining:
            self.metrics.rejected(self.direction, "draining")
            relay.reject()
            return
        if len(self.connections) >= self.limits.max_connections:
            self.metrics.rejected(self.direction, "connection_limit")
            relay.reject()
            return
        relay.tracked = True
        self.connections.add(relay)
        transport = relay.transport
        try:
            dst_ip, dst_port = self.original_destination(transport.get_extra_info("socket"))
        except Exception as exc:  # injected by the capture backend: any failure means "unknown"
            log.debug("%s: no original destination: %s", self.direction, exc)
            self.metrics.rejected(self.direction, "no_original_destination")
            relay.refuse(None, "NR")
            return
        snapshot = self.inputs.state.snapshot or self._no_snapshot
        if self.intercept(relay, snapshot, dst_ip, dst_port):
            return
        if dst_port == self.port:
            local = transport.get_extra_info("sockname")
            if local is not None and local[0] == dst_ip:
                self.metrics.rejected(self.direction, "proxy_loop")
                relay.refuse(None, "NR")
                return
        decision = self.decide(snapshot, dst_ip, dst_port)
        peer = transport.get_extra_info("peername")
        peer_ip = peer[0] if peer else ""
        labels = connection_labels(snapshot, decision, peer_ip, self.reporter)
        if isinstance(decision, Refuse):
            if self.answer_refusal(relay, snapshot, decision, labels, peer_ip, (dst_ip, dst_port)):
                return
            self.metrics.rejected(self.direction, decision.metric_reason)
            relay.refuse(labels, decision.response_flags)
            return
        self.dispatch(relay, snapshot, decision, labels, peer_ip, (dst_ip, dst_port))

    def intercept(self, relay: Relay, snapshot: NodeSnapshot, dst_ip: str, dst_port: int) -> bool:
        """Take over a connection before the L4 decision (the inbound tunnel); True if taken."""
        return False

    def answer_refusal(self, relay: Relay, snapshot: NodeSnapshot, decision: Refuse, labels: TcpLabels,
                       peer_ip: str, dst: tuple[str, int]) -> bool:
        """Take over a refusal (the outbound L7 side answers HTTP with a 503); True if taken."""
        return False

    def dispatch(self, relay: Relay, snapshot: NodeSnapshot, decision: Decision, labels: TcpLabels,
                 peer_ip: str, dst: tuple[str, int]) -> None:
        """Act on a decision that is not a refusal (``dst``: the original destination):
        plaintext L4 unless a subclass knows better."""
        relay.forward(decision.address, labels)

    def relay_done(self, relay: Relay) -> None:
        """Called once per tracked connection when both sides are closed."""
        self.connections.discard(relay)
        if self._empty is not None and not self.connections:
            self._empty.set()

    # labels helper for subclasses/tests
    def labels_for(self, snapshot: NodeSnapshot, decision: Decision, src_ip: str) -> TcpLabels:
        return connection_labels(snapshot, decision, src_ip, self.reporter)
