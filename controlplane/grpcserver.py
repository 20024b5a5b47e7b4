"""The discovery server: one grpc.aio bidirectional stream per agent (hostmesh.api.v1.Discovery).

Protocol (controlplane/api/discovery.proto): the agent opens the stream with a Hello
naming its node and the resources it already holds; the server answers with one
update carrying only what differs (always, even when empty, so the agent knows it is in
sync), then pushes an update whenever its node's snapshot changes. At most one update
is in flight per stream: the next one is computed after the agent ACKs or NACKs, from
what the agent then holds, so bursts of publishes coalesce. A NACKed version is not
pushed again; the agent stays on its previous version until a newer snapshot exists.

Full vs delta (decided from bench/controlplane.py, 1000 services x 10 endpoints, 10 000
workloads, every node seeing everything, 2 CPUs): a full snapshot is 1.8 MB per node,
so a state-of-the-world push of one endpoint change to 1000 agents moved 1.8 GB and took
~11.7 s to be ACKed by all; as a delta it is one ~660-byte update per agent and all 1000
ACKed in 0.14-0.45 s (100 agents: 0.02-0.04 s delta, 0.7 s full). Delta is therefore the
default (``delta=True``); ``delta=False`` sends the complete resource set with
``full_state`` on every push (kept for comparison and debugging).

Reconnects: a large agent's Hello carries only the digest of what it holds plus 64
bucket digests. A digest equal to the node's current or previous snapshot (the usual
case after a control-plane restart) needs nothing more; otherwise the server asks
(``send_versions``) for the versions of the buckets that differ and answers with the
delta against the snapshot it compared with. At 1000 agents x 11 000 resources a
restart with unchanged config costs the server 0.8 s CPU (59 B per agent), with one
service changed while it was down 1.2 s CPU and 131 MB peak RSS; uploading every
version in every Hello cost 10 s CPU and 1.4 GB.

Encoding: every resource version is serialized once in the cache and each agent's
update is assembled from those shared bytes (a pass-through response serializer), so
the per-agent cost of a push does not depend on the snapshot size.

Large pushes (initial syncs of big snapshots) are limited to ``max_concurrent_large_pushes``
in flight at a time (released on ACK/NACK, stream end or after ``large_push_hold``
seconds) so 1000 agents reconnecting at once do not make the server buffer 1000 full
snapshots.

TLS: pass ``server_credentials=grpc.ssl_server_credentials(...)``; None serves plaintext.
Authentication: with ``authenticate`` (controlplane/auth.py ``NodeTokens.authenticate``)
every stream must carry its node's bootstrap token (else UNAUTHENTICATED) and may only
stream the snapshot of that node (a Hello naming another node: PERMISSION_DENIED).
``extra_handlers`` are served on the same port (the certificate service).
gRPC objects are created in ``start()``, in the process and event loop that serve.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from controlplane.api import SERVICE_NAME
from controlplane.api import discovery_pb2 as pb
from controlplane.auth import Unauthenticated
from controlplane.tokenreview import resolve
from controlplane.cache import SnapshotCache
from controlplane.metrics import ControlPlaneMetrics
from controlplane.resources import (
    BUCKET_DIGEST_BYTES,
    BUCKETS,
    Delta,
    NodeResources,
    delta,
    differing_buckets,
    encode_update,
)
from nodeagent.state import NodeSnapshot

log = logging.getLogger("hostmesh.controlplane.grpc")

#: Updates (server -> agent) may hold a whole large snapshot.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
#: Agent messages are small except a Hello listing every resource version (~45 B each:
#: 32 MiB is ~700 000 resources); agents are not trusted to send more.
DEFAULT_MAX_RECEIVE_BYTES = 32 * 1024 * 1024
MAX_NODE_NAME = 253


@dataclass(frozen=True)
class Keepalive:
    """Server-side keepalive: the server pings idle connections and tolerates agent pings.

    ``min_client_ping_interval_ms`` must stay below the agents' keepalive time
    (nodeagent/cpclient.py pings every 20 s), or the server answers GOAWAY too_many_pings."""

    time_ms: int = 30_000
    timeout_ms: int = 10_000
    min_client_ping_interval_ms: int = 10_000
    max_ping_strikes: int = 2


def server_options(keepalive: Keepalive = Keepalive(), max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                   max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.keepalive_time_ms", keepalive.time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive.min_client_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", keepalive.max_ping_strikes),
        # streams sit idle between config changes; keep pinging anyway
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_receive_bytes),
        # a second control plane on the same port must fail to bind, not share the port
        ("grpc.so_reuseport", 0),
    ]


def _serialize(msg: bytes | pb.SnapshotUpdate) -> bytes:
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


class _Permit:
    """One slot of the large-push semaphore, released exactly once."""

    __slots__ = ("_sem", "_timer")

    def __init__(self, sem: asyncio.Semaphore, hold: float) -> None:
        self._sem: asyncio.Semaphore | None = sem
        self._timer = asyncio.get_running_loop().call_later(hold, self.release)

    def release(self) -> None:
        if self._sem is not None:
            self._sem.release()
            self._sem = None
            self._timer.cancel()


class _AgentStream:
    __slots__ = (
        "answered_hello",
        "awaiting_versions",
        "connected_at",
        "declared_buckets",
        "declared_digest",
        "held",
        "held_version",
        "id",
        "inflight",
        "nacked_version",
        "node",
        "nonces",
        "peer",
        "pending",
        "permit",
        "versions_buckets",
        "versions_target",
    )

    def __init__(self, sid: int, node: str, peer: str, hello: pb.Hello, now: float) -> None:
        self.id = sid
        self.node = node
        self.peer = peer
        # what the agent holds: the NodeResources it ACKed, or the versions it declared
        self.held: NodeResources | dict[str, str] | None = None
        self.held_version = hello.snapshot_version
        # a digest still to be matched against the cache (Hello without versions)
        self.declared_digest = ""
        self.declared_buckets = b""
        self.awaiting_versions = False
        # the snapshot (and buckets) the versions we asked for will be compared against
        self.versions_target: NodeResources | None = None
        self.versions_buckets: list[int] | None = None
        # an update computed from versions the agent uploaded (so the upload is not kept)
        self.pending: tuple[NodeResources, Delta] | None = None
        self.declare(hello)
        self.connected_at = now
        self.inflight: tuple[str, NodeResources] | None = None
        self.nacked_version = ""
        self.answered_hello = False
        self.permit: _Permit | None = None
        self.nonces = itertools.count(1)

    def declare(self, hello: pb.Hello) -> None:
        self.held = dict(hello.resource_versions) or None
        self.held_version = hello.snapshot_version
        self.declared_digest = hello.resource_digest if self.held is None else ""
        self.declared_buckets = hello.bucket_digests if self.declared_digest else b""
        self.awaiting_versions = False


class DiscoveryServer:
    """Serves the discovery stream from a SnapshotCache.

    ``node_default_snapshot(node)``, if given and the cache has no ``snapshot_for_new_node``
    callback, becomes it: it is asked for a snapshot when an agent connects for a node the
    cache does not know yet."""

    def __init__(self, cache: SnapshotCache, metrics: ControlPlaneMetrics | None = None,
                 node_default_snapshot: Callable[[str], NodeSnapshot | None] | None = None, *,
                 server_credentials: grpc.ServerCredentials | None = None,
                 delta: bool = True,
                 keepalive: Keepalive = Keepalive(),
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
                 max_concurrent_large_pushes: int = 64,
                 large_push_bytes: int = 1 << 20,
                 large_push_hold: float = 30.0,
                 authenticate: Callable[[Any], str] | None = None,
                 extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
                 on_health: Callable[[str, list[tuple[str, int, str]], int], None] | None = None,
                 on_stream_end: Callable[[str, int], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cache = cache
        self.on_health = on_health  # (node, unhealthy endpoints, stream id) from an agent's HealthReport
        self.on_stream_end = on_stream_end  # (node, stream id): a report's stream is gone (controlplane/health.py)
        self.authenticate = authenticate
        self.extra_handlers = tuple(extra_handlers)
        self.metrics = metrics if metrics is not None else cache.metrics
        if node_default_snapshot is not None and cache.snapshot_for_new_node is None:
            cache.snapshot_for_new_node = node_default_snapshot
        self.server_credentials = server_credentials
        self.delta = delta
        self.keepalive = keepalive
        self.max_message_bytes = max_message_bytes
        self.max_receive_bytes = max_receive_bytes
        self.max_concurrent_large_pushes = max_concurrent_large_pushes
        self.large_push_bytes = large_push_bytes
        self.large_push_hold = large_push_hold
        self.clock = clock
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._large: asyncio.Semaphore | None = None
        self._ids = itertools.count(1)
        self._streams: dict[int, _AgentStream] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self, address: str = "0.0.0.0:15010") -> int:
        """Bind and serve; returns the bound port (use port 0 for an ephemeral one)."""
        self._large = asyncio.Semaphore(self.max_concurrent_large_pushes)
        server = grpc.aio.server(options=server_options(self.keepalive, self.max_message_bytes,
                                                        self.max_receive_bytes))
        handler = grpc.stream_stream_rpc_method_handler(
            self._stream, request_deserializer=pb.AgentMessage.FromString, response_serializer=_serialize)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"StreamSnapshots": handler}), *self.extra_handlers))
        if self.server_credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, self.server_credentials)
        if not port:
            raise OSError(f"cannot bind the discovery server to {address}")
        await server.start()
        self._server = server
        self.port = port
        log.info("discovery server listening", extra={"address": address, "port": port,
                                                      "tls": self.server_credentials is not None})
        return port

    async def stop(self, grace: float | None = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    @property
    def streams(self) -> int:
        return len(self._streams)

    def stream_info(self) -> list[dict]:
        return [{"id": s.id, "node": s.node, "peer": s.peer, "held_version": s.held_version,
                 "inflight": s.inflight[1].version if s.inflight else None} for s in self._streams.values()]

    # ------------------------------------------------------------------ one agent
    async def _stream(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        authed = await self._authenticate(context)
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a Hello")
        hello = first.hello
        node = hello.node
        if not node or len(node) > MAX_NODE_NAME or any(c.isspace() for c in node):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Hello.node: invalid node name {node!r}")
        if authed is not None and node != authed:
            log.warning("agent refused: Hello names another node", extra={"node": authed, "hello_node": node})
            self.metrics.authentication_failures.labels("discovery").inc()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"node {authed!r} may only stream its own snapshot, the Hello names {node!r}")
        st = _AgentStream(next(self._ids), node, context.peer(), hello, self.clock())
        agent_version, declared = hello.agent_version, len(hello.resource_versions)
        del first, hello  # a large Hello must not live as long as the stream
        self._streams[st.id] = st
        self.cache.agent_connected(node, st.peer, agent_version)
        self.metrics.agents_connected.inc()
        watch = self.cache.watch(node)
        reader = asyncio.ensure_future(self._read(context, st, watch))
        log.info("agent connected", extra={"node": node, "peer": st.peer, "agent_version": agent_version,
                                           "snapshot_version": st.held_version, "declared_resources": declared,
                                           "declared_digest": st.declared_digest})
        asked_new = False
        try:
            while not reader.done():
                watch.event.clear()
                if st.inflight is None and st.pending is not None:
                    target, d = st.pending
                    st.pending = None
                    await self._send(context, st, target, d)
                    continue
                if st.inflight is None and not st.awaiting_versions:
                    target = self.cache.resources(node)
                    if target is None:
                        if not asked_new:
                            asked_new = True
                            asyncio.ensure_future(self.cache.ensure_snapshot(node))
                    elif self._should_push(st, target):
                        if st.declared_digest:
                            st.held = self.cache.match_digest(node, st.declared_digest)
                            if st.held is None:
                                await self._request_versions(context, st, target)
                                continue
                            st.declared_digest = ""
                        await self._push(context, st, target)
                        continue  # re-check at once: a publish may have raced the write
                await watch.event.wait()
            exc = reader.exception()
            if isinstance(exc, _ProtocolError):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            reader.cancel()
            if st.permit is not None:
                st.permit.release()
            self.cache.unwatch(watch)
            self.cache.agent_disconnected(node)
            self.metrics.agents_connected.dec()
            del self._streams[st.id]
            if self.on_stream_end is not None:
                self.on_stream_end(node, st.id)
            log.info("agent disconnected", extra={"node": node, "peer": st.peer})

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> str | None:
        if self.authenticate is None:
            return None
        try:
            return await resolve(self.authenticate(context.invocation_metadata()))
        except Unauthenticated as exc:
            log.warning("agent refused: bad credentials", extra={"peer": context.peer(), "reason": str(exc)})
            self.metrics.authentication_failures.labels("discovery").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))

    @staticmethod
    def _should_push(st: _AgentStream, target: NodeResources) -> bool:
        if not st.answered_hello:
            return True
        if target.version == st.nacked_version:
            return False  # the agent refused exactly this; wait for a newer snapshot
        return target.version != st.held_version

    async def _push(self, context: grpc.aio.ServicerContext, st: _AgentStream, target: NodeResources) -> None:
        await self._send(context, st, target, delta(st.held, target, full_state=not self.delta))

    async def _send(self, context: grpc.aio.ServicerContext, st: _AgentStream, target: NodeResources,
                    d: Delta) -> None:
        # d holds shared bytes only; the per-agent copy is made below, under the permit
        if d.size >= self.large_push_bytes and self._large is not None:
            await self._large.acquire()
            st.permit = _Permit(self._large, self.large_push_hold)
        nonce = f"{st.id}.{next(st.nonces)}"
        data = encode_update(nonce, target, d)
        st.inflight = (nonce, target)
        st.answered_hello = True
        await context.write(data)
        self.cache.record_sent(st.node, target.version)
        self.metrics.pushes.inc()
        self.metrics.push_bytes.inc(len(data))

    async def _request_versions(self, context: grpc.aio.ServicerContext, st: _AgentStream,
                                target: NodeResources) -> None:
        """The agent's digest matches nothing we know: ask for the versions of the buckets
        that differ from ``target`` (all of them when it sent no bucket digests)."""
        buckets = None
        if len(st.declared_buckets) == BUCKETS * BUCKET_DIGEST_BYTES:
            buckets = differing_buckets(target.bucket_digests(), st.declared_buckets) or None
        st.awaiting_versions = True
        st.versions_target = target
        st.versions_buckets = buckets
        await context.write(pb.SnapshotUpdate(nonce=f"{st.id}.{next(st.nonces)}", send_versions=True,
                                              version_buckets=buckets or []))

    async def _read(self, context: grpc.aio.ServicerContext, st: _AgentStream, watch) -> None:
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    return
                kind = msg.WhichOneof("kind")
                if kind == "ack":
                    self._on_ack(st, msg.ack)
                elif kind == "nack":
                    self._on_nack(st, msg.nack)
                elif kind == "hello" and st.awaiting_versions:
                    self._on_versions(st, msg.hello)
                elif kind == "health":
                    if self.on_health is not None:  # on the stream's own (authenticated) node only
                        self.on_health(st.node, [(e.address, e.port, e.service) for e in msg.health.unhealthy],
                                       st.id)
                    continue  # nothing to push because of it here: the cache's watch does that
                else:
                    raise _ProtocolError(f"unexpected {kind or 'empty'} message after the Hello")
                watch.event.set()
        finally:
            watch.event.set()

    def _on_versions(self, st: _AgentStream, hello: pb.Hello) -> None:
        """The agent uploaded its resource versions: compute its update now and drop them."""
        if hello.node != st.node:
            raise _ProtocolError("a second Hello must name the same node")
        st.awaiting_versions = False
        st.declared_digest = ""
        st.held = None  # from here on unknown until it ACKs (a NACK leads to a full_state push)
        st.held_version = hello.snapshot_version
        # compare with the snapshot the buckets were chosen from, even if a newer one exists:
        # once this is ACKed the agent holds exactly it, and the next push is a plain delta
        target, buckets = st.versions_target, st.versions_buckets
        st.versions_target = st.versions_buckets = None
        if target is not None:
            st.pending = (target, delta(hello.resource_versions, target, full_state=not self.delta,
                                        buckets=buckets))

    def _take_inflight(self, st: _AgentStream, nonce: str) -> NodeResources | None:
        if st.inflight is None or st.inflight[0] != nonce:
            log.debug("ignoring a reply to an unknown nonce", extra={"node": st.node, "nonce": nonce})
            return None
        target = st.inflight[1]
        st.inflight = None
        if st.permit is not None:
            st.permit.release()
            st.permit = None
        return target

    def _on_ack(self, st: _AgentStream, ack: pb.Ack) -> None:
        target = self._take_inflight(st, ack.nonce)
        if target is None:
            return
        st.held = target
        st.held_version = target.version
        st.nacked_version = ""
        latency = max(0.0, self.clock() - max(target.published_at, st.connected_at))
        self.metrics.push_latency.observe(latency)
        self.cache.record_ack(st.node, target.version, latency)

    def _on_nack(self, st: _AgentStream, nack: pb.Nack) -> None:
        target = self._take_inflight(st, nack.nonce)
        if target is None:
            return
        st.nacked_version = target.version
        self.metrics.nacks.inc()
        self.cache.record_nack(st.node, target.version, nack.error_detail or "(no error detail)")


class _ProtocolError(Exception):
    pass
