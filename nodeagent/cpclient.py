"""The agent's side of the discovery stream: receive snapshots, apply them atomically, persist, ACK.

The agent creates one ``ControlPlaneClient`` and runs ``await client.run()`` as a task for
its whole life (cancel the task to stop); ``status()`` feeds /ready, /server_info and
``hostmesh status``:

    client = ControlPlaneClient("198.18.0.2:15010", node, state, SnapshotStore(path), registry,
                                validate=check_snapshot)
    task = asyncio.create_task(client.run())

What ``run()`` does:

* first, if ``state`` holds no snapshot, it loads the persisted one (``SnapshotStore``) and
  serves it at once, marked stale, so an agent restarted while the control plane is down
  keeps serving its last known good config;
* connects (keepalive pings every 20 s, also without calls) and sends a Hello with the
  node, the snapshot version it serves and the digest of the resources it holds, plus
  the version of each of them inline when there are few (<= INLINE_VERSIONS_MAX); a
  larger agent sends 64 bucket digests instead and, only if the control plane does not
  recognise its digest, the versions of the buckets it asks for;
* for each update: rebuilds the full ``NodeSnapshot`` from its resources plus the changed
  and minus the removed ones, checks the control plane's digest of the complete resource
  set, validates every resource that arrived through ``NodeSnapshot.from_dict`` (the
  unchanged ones were validated when they arrived) plus the snapshot-wide rules (one
  service per VIP:port) and the injected ``validate`` callback, then applies it with
  ``state.apply()`` (connections already running keep the snapshot object they took),
  persists it and ACKs. On any problem it NACKs with the error and keeps the previous
  snapshot. A digest mismatch (its resource state drifted) NACKs and reconnects at once,
  declaring what it holds, so the control plane resends what differs;
* when the stream breaks it keeps serving what it has (``stale``) and reconnects with
  exponential backoff and full jitter (``backoff_initial`` doubling up to ``backoff_max``;
  reset after a session that synced).

Metrics (on the injected registry): ``hostmesh_agent_controlplane_connected``,
``hostmesh_agent_config_stale`` (1 while not connected to the control plane),
``hostmesh_agent_snapshot_applies_total``, ``hostmesh_agent_snapshot_nacks_total``.

Security: with ``auth`` (nodeagent/identity/cpauth.py) the channel is TLS, verified against
the bootstrap root bundle plus ``extra_roots()`` (the newest trust bundle from the CA, so
a root rotation never cuts the agent off), and every stream carries the node's token.

gRPC objects (channel, call) are created inside ``run()``, in the agent's process and loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from controlplane.api import STREAM_METHOD
from controlplane.api import discovery_pb2 as pb
from controlplane.cache import iso
from controlplane.resources import (
    InconsistentSnapshot,
    ResourceObject,
    bucket_digests,
    bucket_of,
    merge,
    resource_digest,
    resource_name,
    resource_to_dict,
    split,
)
from hostmesh import __version__
from nodeagent.endpoints import EndpointRotation
from nodeagent.errors import ConfigError
from nodeagent.identity.cpauth import ControlPlaneAuth
from nodeagent.persist import SnapshotStore
from nodeagent.state import AgentState, NodeSnapshot

log = logging.getLogger("hostmesh.agent.cpclient")

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # received: an update may hold a whole large snapshot
MAX_SEND_BYTES = 32 * 1024 * 1024  # sent: the control plane accepts no more (see grpcserver)
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
#: Up to this many resources the Hello lists every version; above, it sends only the
#: digest and the versions when the control plane asks (SnapshotUpdate.send_versions).
INLINE_VERSIONS_MAX = 256


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    keepalive_time_ms: int = KEEPALIVE_TIME_MS,
                    keepalive_timeout_ms: int = KEEPALIVE_TIMEOUT_MS) -> list[tuple[str, Any]]:
    return [
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        # our own reconnect loop decides when to retry; one connection per client
        ("grpc.enable_retries", 0),
        ("grpc.use_local_subchannel_pool", 1),
    ]


def backoff_delay(attempt: int, initial: float, maximum: float, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(maximum, initial * 2**attempt)]."""
    return rand() * min(maximum, initial * 2 ** min(attempt, 32))


class ClientMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge("hostmesh_agent_controlplane_connected",
                               "1 while the agent has a live, synced stream to the control plane",
                               registry=registry)
        self.stale = Gauge("hostmesh_agent_config_stale",
                           "1 while the agent is not connected to the control plane (its config may be stale)",
                           registry=registry)
        self.applies = Counter("hostmesh_agent_snapshot_applies",
                               "Snapshots received from the control plane and applied", registry=registry)
        self.nacks = Counter("hostmesh_agent_snapshot_nacks",
                             "Snapshots received from the control plane and rejected (NACKed)", registry=registry)


class UpdateRejected(Exception):
    """An update the agent NACKs; the message is the error detail sent to the control plane."""


class _Resync(Exception):
    """The agent's resource state drifted from the control plane's: reconnect and resync."""


class ControlPlaneClient:
    def __init__(self, address: str | Sequence[str] | EndpointRotation, node: str, state: AgentState,
                 store: SnapshotStore | None,
                 registry: CollectorRegistry, *,
                 validate: Callable[[NodeSnapshot], None] | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 auth: ControlPlaneAuth | None = None,
                 extra_roots: Callable[[], str] = lambda: "",
                 backoff_initial: float = 0.2, backoff_max: float = 15.0,
                 agent_version: str = __version__,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 keepalive_time_ms: int = KEEPALIVE_TIME_MS,
                 keepalive_timeout_ms: int = KEEPALIVE_TIMEOUT_MS,
                 clock: Callable[[], float] = time.time) -> None:
        self.endpoints = address if isinstance(address, EndpointRotation) else EndpointRotation(address)
        self.node = node
        self.state = state
        self.store = store
        self.validate = validate
        self.credentials = credentials
        self.auth = auth
        self.extra_roots = extra_roots
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.agent_version = agent_version
        self.options = channel_options(max_message_bytes, keepalive_time_ms, keepalive_timeout_ms)
        self.clock = clock
        self.metrics = ClientMetrics(registry)
        self.metrics.stale.set(1)
        # name -> (control-plane version, object) of what the applied snapshot holds
        self._resources: dict[str, tuple[str, ResourceObject]] = {}
        self._resources_of: NodeSnapshot | None = None
        self._hello_digests: tuple[object, str, bytes] | None = None  # (of which map, digest, buckets)
        self._started = clock()
        self._connected = False
        self._connecting = False
        self._last_connected: float | None = None
        self._disconnected_since: float | None = None
        self._acked_version = ""
        self._last_error = ""
        self._last_error_time: float | None = None
        self._last_nack = ""
        self._source: str | None = None
        self._persisted_at = ""
        self._persist_error = ""
        self._attempts = 0
        self._session_endpoint = ""
        self._next_retry: float | None = None
        self._applies = 0
        self._nacks = 0
        # the endpoints of this node the health checks find unhealthy (nodeagent/healthcheck.py),
        # sent on every stream after its first update and whenever they change
        self._health: frozenset[tuple[str, int, str]] = frozenset()
        self._health_changed: asyncio.Event | None = None
        self._write_lock = asyncio.Lock()

    @property
    def address(self) -> str:
        """The replica dialled now (or next)."""
        return self.endpoints.current

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        snap = self.state.snapshot
        stale = not self._connected
        stale_since = (self._disconnected_since or self._started) if stale else None
        if self._connected:
            message = f"connected to the control plane at {self.address}"
        elif snap is not None:
            message = f"stale config since {iso(stale_since)}: control plane {self.address} unreachable"
        else:
            message = f"no config: control plane {self.address} unreachable since {iso(stale_since)}"
        if not self._connected and self._last_error:
            message += f" ({self._last_error})"
        return {
            "address": self.address, "node": self.node, "endpoints": list(self.endpoints.endpoints),
            "failovers": self.endpoints.failovers,
            "connected": self._connected,
            "state": "connected" if self._connected else "connecting" if self._connecting else "disconnected",
            "last_connected": iso(self._last_connected),
            "disconnected_since": iso(self._disconnected_since) if not self._connected else None,
            "snapshot_version": snap.version if snap else None,
            "acked_version": self._acked_version,
            "snapshot_source": self._source,
            "persisted_at": self._persisted_at or None,
            "stale": stale,
            "stale_since": iso(stale_since),
            "message": message,
            "last_error": self._last_error,
            "last_error_time": iso(self._last_error_time),
            "last_nack": self._last_nack,
            "persist_error": self._persist_error,
            "reconnect_attempts": self._attempts,
            "next_retry": iso(self._next_retry) if not self._connected else None,
            "applies": self._applies, "nacks": self._nacks,
        }

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        """Serve the persisted snapshot if needed, then stay connected forever (cancel to stop)."""
        self._started = self.clock()
        self._load_persisted()
        self._attempts = 0
        while True:
            synced = False
            resync = False
            self._connecting = True
            try:
                synced = await self._session()
                self._error("the control plane closed the stream")
            except _Resync as exc:
                resync = True
                self._error(str(exc))
            except asyncio.CancelledError:
                self._set_connected(False)
                self._connecting = False
                raise
            except grpc.aio.AioRpcError as exc:
                self._error(self.auth.explain(exc, self.address) if self.auth else f"{exc.code().name}: {exc.details()}")
            except Exception as exc:  # never let the agent's config loop die
                log.exception("control-plane session failed")
                self._error(f"{type(exc).__name__}: {exc}")
            self._connecting = False
            synced = synced or self._connected
            self._set_connected(False)
            if synced or resync:
                self._attempts = 0
            failed = self._session_endpoint or self.address
            round_failed = resync or self.endpoints.failed(failed)
            if failed != self.address:
                log.warning("failing over to another control-plane replica",
                            extra={"from": failed, "to": self.address, "error": self._last_error})
            delay = 0.0 if resync or not round_failed else backoff_delay(self._attempts, self.backoff_initial,
                                                                         self.backoff_max)
            self._attempts += 1
            self._next_retry = self.clock() + delay
            log.warning("control plane unreachable; serving the last known config",
                        extra={"address": self.address, "error": self._last_error, "retry_in": round(delay, 3),
                               "snapshot_version": self.state.snapshot.version if self.state.snapshot else None})
            await asyncio.sleep(delay)

    def _load_persisted(self) -> None:
        if self.state.snapshot is not None:
            self._source = "local"
            return
        if self.store is None:
            return
        rec = self.store.load_record()
        if rec is None:
            return
        if rec.snapshot.node != self.node:
            log.error("ignoring the persisted snapshot of another node",
                      extra={"path": str(self.store.path), "snapshot_node": rec.snapshot.node})
            return
        try:
            if self.validate is not None:
                self.validate(rec.snapshot)
        except Exception as exc:
            log.error("ignoring the persisted snapshot: it does not validate", extra={"error": str(exc)})
            return
        self.state.apply(rec.snapshot)
        self._source = "persisted"
        self._persisted_at = rec.saved_at
        self._index_current(rec.resource_versions)
        log.warning("serving the persisted snapshot until the control plane answers",
                    extra={"version": rec.snapshot.version, "saved_at": rec.saved_at})

    def _index_current(self, known_versions: dict[str, str] | None = None) -> None:
        """Make the resource map match the snapshot in force (after a load or a local change)."""
        snap = self.state.snapshot
        if snap is None:
            self._resources, self._resources_of = {}, None
            return
        try:
            res = split(snap)
        except InconsistentSnapshot as exc:
            log.error("the snapshot in force cannot be split; declaring nothing", extra={"error": str(exc)})
            res = {}
        if known_versions:
            # the control plane's own versions of these objects, when we persisted them
            res = {n: (known_versions.get(n, v), o) for n, (v, o) in res.items()}
        self._resources, self._resources_of = res, snap

    def report_health(self, unhealthy: frozenset[tuple[str, int, str]]) -> None:
        """The health checker's latest set; sent on the stream (now, or once one is up)."""
        if unhealthy == self._health:
            return
        self._health = frozenset(unhealthy)
        if self._health_changed is not None:
            self._health_changed.set()

    def _health_message(self) -> pb.AgentMessage:
        return pb.AgentMessage(health=pb.HealthReport(unhealthy=[
            pb.EndpointKey(address=a, port=p, service=s) for a, p, s in sorted(self._health)]))

    async def _send_health(self, call, lock: asyncio.Lock) -> None:
        """While the stream lives: the current set once, then each change (never two writes at once)."""
        changed = self._health_changed = asyncio.Event()
        if self._health:  # a new stream's control plane knows nothing of this node yet
            changed.set()
        try:
            while True:
                await changed.wait()
                changed.clear()
                async with lock:
                    await call.write(self._health_message())
        except (grpc.RpcError, grpc.aio.UsageError, RuntimeError) as exc:  # the stream ended: the next one resends
            log.debug("health report not sent: %s", exc)

    async def _session(self) -> bool:
        if self.state.snapshot is not self._resources_of:
            self._index_current()
        metadata = None
        self._session_endpoint = self.address
        if self.auth is not None:
            channel = grpc.aio.secure_channel(self.address, self.auth.credentials(self.extra_roots()),
                                              options=self.options + self.auth.options())
            metadata = self.auth.metadata()
        elif self.credentials is None:
            channel = grpc.aio.insecure_channel(self.address, options=self.options)
        else:
            channel = grpc.aio.secure_channel(self.address, self.credentials, options=self.options)
        synced = False
        lock = self._write_lock = asyncio.Lock()  # the health sender writes on the same stream as acks/nacks
        health_task: asyncio.Task | None = None
        try:
            call = channel.stream_stream(STREAM_METHOD, request_serializer=pb.AgentMessage.SerializeToString,
                                         response_deserializer=pb.SnapshotUpdate.FromString)(metadata=metadata)
            await call.write(self._hello(with_versions=len(self._resources) <= INLINE_VERSIONS_MAX))
            while True:
                update = await call.read()
                if update is grpc.aio.EOF:
                    return synced
                if update.send_versions:
                    await call.write(self._hello(with_versions=True, buckets=update.version_buckets))
                    continue
                try:
                    await self._apply(update)
                except _Resync as exc:
                    await self._nack(call, update, str(exc))
                    raise
                except UpdateRejected as exc:
                    await self._nack(call, update, str(exc))
                else:
                    self._acked_version = update.snapshot_version
                    async with lock:
                        await call.write(pb.AgentMessage(ack=pb.Ack(nonce=update.nonce,
                                                                    snapshot_version=update.snapshot_version)))
                if not synced:
                    synced = True
                    self.endpoints.succeeded()
                    self._set_connected(True)
                    health_task = asyncio.get_running_loop().create_task(self._send_health(call, lock))
        finally:
            if health_task is not None:
                health_task.cancel()
                self._health_changed = None
            await channel.close()

    def _hello(self, *, with_versions: bool, buckets=()) -> pb.AgentMessage:
        snap = self.state.snapshot
        versions = {n: v for n, (v, _) in self._resources.items()}
        hello = pb.Hello(node=self.node, agent_version=self.agent_version,
                         snapshot_version=snap.version if snap else "")
        if versions:
            if self._hello_digests is None or self._hello_digests[0] is not self._resources:
                self._hello_digests = (self._resources, resource_digest(versions), bucket_digests(versions))
            hello.resource_digest = self._hello_digests[1]
            if with_versions:
                wanted = set(buckets)
                hello.resource_versions.update(
                    {n: v for n, v in versions.items() if bucket_of(n) in wanted} if wanted else versions)
            else:
                hello.bucket_digests = self._hello_digests[2]
        return pb.AgentMessage(hello=hello)

    async def _nack(self, call, update: pb.SnapshotUpdate, error: str) -> None:
        self._nacks += 1
        self._last_nack = error
        self.metrics.nacks.inc()
        log.error("snapshot rejected; keeping the previous one",
                  extra={"version": update.snapshot_version, "error": error})
        snap = self.state.snapshot
        async with self._write_lock:
            await call.write(pb.AgentMessage(nack=pb.Nack(nonce=update.nonce,
                                                          snapshot_version=snap.version if snap else "",
                                                          error_detail=error)))

    # ------------------------------------------------------------------ one update
    async def _apply(self, update: pb.SnapshotUpdate) -> None:
        # rebuilding and validating a large snapshot is CPU work: keep it off the proxy's loop
        snapshot, resources = await asyncio.to_thread(self._build, update)
        if self.validate is not None:
            try:
                self.validate(snapshot)
            except Exception as exc:
                raise UpdateRejected(f"snapshot {update.snapshot_version}: {exc}") from None
        self.state.apply(snapshot)
        self._resources, self._resources_of = resources, snapshot
        self._source = "controlplane"
        self._applies += 1
        self.metrics.applies.inc()
        log.info("snapshot applied", extra={"version": snapshot.version, "changed": len(update.changed),
                                            "removed": len(update.removed), "services": len(snapshot.services),
                                            "workloads": len(snapshot.workloads)})
        if self.store is not None:
            versions = {n: v for n, (v, _) in resources.items()}
            try:
                await asyncio.to_thread(self.store.save, snapshot, versions)
                self._persist_error = ""
            except OSError as exc:  # serving the new config matters more than saving it
                self._persist_error = f"{self.store.path}: {exc.strerror or exc}"
                log.error("cannot persist the snapshot", extra={"error": self._persist_error})

    def _build(self, update: pb.SnapshotUpdate) -> tuple[NodeSnapshot, dict[str, tuple[str, ResourceObject]]]:
        """The complete snapshot this update describes; raises UpdateRejected or _Resync."""
        version = update.snapshot_version
        where = f"snapshot {version or '(no version)'}"
        if not version:
            raise UpdateRejected(f"{where}: the update has no snapshot_version")
        resources = {} if update.full_state else dict(self._resources)
        for name in update.removed:
            resources.pop(name, None)
        docs: dict[str, list] = {"services": [], "workloads": [], "config": []}
        names: dict[str, list[tuple[str, str]]] = {"services": [], "workloads": [], "config": []}
        for r in update.changed:
            try:
                fld, doc = resource_to_dict(r)
            except ValueError as exc:
                raise UpdateRejected(f"{where}: {exc}") from None
            docs[fld].append(doc)
            names[fld].append((r.name, r.version))
        if update.changed:
            try:
                parsed = NodeSnapshot.from_dict({"node": self.node, **docs}, source=where)
            except ConfigError as exc:
                raise UpdateRejected(str(exc)) from None
            for fld in ("services", "workloads", "config"):
                for (name, rversion), obj in zip(names[fld], getattr(parsed, fld), strict=True):
                    if resource_name(obj) != name:
                        raise UpdateRejected(f"{where}: resource {name!r} carries {resource_name(obj)!r}")
                    if not rversion:
                        raise UpdateRejected(f"{where}: resource {name!r} has no version")
                    resources[name] = (rversion, obj)
        if update.resource_digest:
            mine = resource_digest({n: v for n, (v, _) in resources.items()})
            if mine != update.resource_digest:
                raise _Resync(f"{where}: resource digest mismatch (agent {mine}, control plane "
                              f"{update.resource_digest}); resyncing")
        snapshot = merge(self.node, version, (o for _, o in resources.values()))
        _check_snapshot_rules(snapshot, where)
        return snapshot, resources

    # ------------------------------------------------------------------ bookkeeping
    def _set_connected(self, connected: bool) -> None:
        if connected == self._connected:
            return
        now = self.clock()
        self._connected = connected
        if connected:
            self._last_connected = now
            self._disconnected_since = None
            self._next_retry = None
            self._last_error = ""
            log.info("connected to the control plane", extra={"address": self.address})
        else:
            self._disconnected_since = now
        self.metrics.connected.set(1 if connected else 0)
        self.metrics.stale.set(0 if connected else 1)

    def _error(self, message: str) -> None:
        self._last_error = message
        self._last_error_time = self.clock()


def _check_snapshot_rules(snap: NodeSnapshot, where: str) -> None:
    """The snapshot-wide rules of NodeSnapshot.from_dict, on the merged snapshot."""
    seen: dict[tuple[str, int], str] = {}
    errors = []
    for svc in snap.services:
        for p in svc.ports:
            key = (svc.cluster_ip, p.port)
            other = seen.get(key)
            if other is not None:
                errors.append(f"{where}: services {other} and {svc.namespace}/{svc.name} both use "
                              f"{svc.cluster_ip}:{p.port}")
            seen[key] = f"{svc.namespace}/{svc.name}"
    if errors:
        raise UpdateRejected("\n".join(errors))


__all__ = ["ClientMetrics", "ControlPlaneClient", "UpdateRejected", "backoff_delay", "channel_options"]
