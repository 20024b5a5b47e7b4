"""The snapshot cache between the snapshot builder and the discovery server.

go-control-plane style: the builder publishes one immutable, versioned ``NodeSnapshot``
per node (``set_snapshots`` / ``set_snapshot``); the cache checks each one for
consistency before publishing it (an injected callable plus the cache's own check that
resource names are unique), and on any failure rejects the whole publish and keeps the
previous snapshots in force. Each published snapshot is indexed into shared, encoded
resources (controlplane/resources.py) once, whatever the number of agents.

Streams of the discovery server *watch* their node: a publish wakes them and each
computes its agent's delta. The cache also keeps one status record per node for
/debug/agents and ``hostmesh status``: connected, peer, connected since, sent version,
ACKed version, last NACK error and time, last push latency.

The cache knows nothing about how snapshots are made, nor about gRPC.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Union

from controlplane.metrics import ControlPlaneMetrics
from controlplane.resources import InconsistentSnapshot, NodeResources, ResourceIndex
from nodeagent.state import NodeSnapshot

log = logging.getLogger("hostmesh.controlplane.cache")

ConsistencyCheck = Callable[[NodeSnapshot], None]
NewNodeCallback = Callable[[str], Union[NodeSnapshot, None, Awaitable[Union[NodeSnapshot, None]]]]


class SnapshotRejected(Exception):
    """A publish refused by the consistency check; ``errors`` maps node -> reason."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        lines = [f"node {node}: {err}" for node, err in sorted(self.errors.items())]
        super().__init__("snapshot rejected, previous snapshot kept:\n" + "\n".join(lines))


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds") if ts else None


@dataclass
class AgentStatus:
    """What the control plane knows about the agent(s) of one node."""

    node: str
    streams: int = 0
    peer: str = ""
    agent_version: str = ""
    connected_since: float | None = None
    disconnected_at: float | None = None
    sent_version: str = ""
    sent_at: float | None = None
    acked_version: str = ""
    acked_at: float | None = None
    last_nack_error: str = ""
    last_nack_version: str = ""
    last_nack_time: float | None = None
    last_push_latency: float | None = None
    pushes: int = 0
    nacks: int = 0

    @property
    def connected(self) -> bool:
        return self.streams > 0

    def to_dict(self, latest_version: str = "") -> dict:
        return {
            "node": self.node, "connected": self.connected, "streams": self.streams, "peer": self.peer,
            "agent_version": self.agent_version,
            "connected_since": iso(self.connected_since), "disconnected_at": iso(self.disconnected_at),
            "latest_version": latest_version, "sent_version": self.sent_version, "sent_at": iso(self.sent_at),
            "acked_version": self.acked_version, "acked_at": iso(self.acked_at),
            "in_sync": bool(latest_version) and self.acked_version == latest_version,
            "last_nack_error": self.last_nack_error, "last_nack_version": self.last_nack_version,
            "last_nack_time": iso(self.last_nack_time),
            "last_push_latency_seconds": self.last_push_latency,
            "pushes": self.pushes, "nacks": self.nacks,
        }


class _Watch:
    __slots__ = ("event", "loop", "node", "thread")

    def __init__(self, node: str) -> None:
        self.node = node
        self.event = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()

    def wake(self) -> None:
        if threading.get_ident() == self.thread:
            self.event.set()
        else:
            self.loop.call_soon_threadsafe(self.event.set)


@dataclass
class _AckWaiter:
    remaining: dict[str, str]
    future: asyncio.Future


class SnapshotCache:
    """Per-node published snapshots, their watchers and the agents' status.

    ``consistency_check(snapshot)`` raises (any exception; its message is the reason) to
    refuse a snapshot. ``snapshot_for_new_node(node)`` is asked when an agent connects for
    a node that has no snapshot yet: it may return the node's snapshot (sync or async), or
    None after arranging for one to be published (e.g. the process rebuilds with that node
    and calls ``set_snapshots``); the agent's stream waits until it is.

    ``set_snapshot(s)`` may be called from any thread; everything else from the event loop.
    """

    def __init__(self, *, consistency_check: ConsistencyCheck | None = None,
                 snapshot_for_new_node: NewNodeCallback | None = None,
                 metrics: ControlPlaneMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.consistency_check = consistency_check
        self.snapshot_for_new_node = snapshot_for_new_node
        self.metrics = metrics if metrics is not None else ControlPlaneMetrics()
        self.clock = clock
        self.last_rejection = ""
        self.last_rejection_time: float | None = None
        self._lock = threading.Lock()
        self._index = ResourceIndex()
        self._published: dict[str, NodeResources] = {}
        # each node's previously published snapshot: agents that reconnect holding it are
        # recognised by digest and get a delta without uploading their resource versions
        self._previous: dict[str, NodeResources] = {}
        self._watches: dict[str, set[_Watch]] = {}
        self._status: dict[str, AgentStatus] = {}
        self._pending_new: set[str] = set()
        self._ack_waiters: list[_AckWaiter] = []

    # ------------------------------------------------------------------ publishing
    def set_snapshot(self, node: str, snapshot: NodeSnapshot) -> None:
        self.set_snapshots({node: snapshot})

    def set_snapshots(self, snapshots: Mapping[str, NodeSnapshot]) -> None:
        """Publish the given nodes' snapshots (other nodes keep theirs), all or nothing.

        Raises SnapshotRejected (and publishes nothing) when any snapshot fails the
        consistency check; snapshots whose version is already published are skipped."""
        now = self.clock()
        woken: list[_Watch] = []
        with self._lock:
            errors: dict[str, str] = {}
            staged: dict[str, NodeResources] = {}
            for node, snap in snapshots.items():
                if not isinstance(snap, NodeSnapshot):
                    errors[node] = f"not a NodeSnapshot: {type(snap).__name__}"
                    continue
                if snap.node != node:
                    errors[node] = f"snapshot is for node {snap.node!r}"
                    continue
                cur = self._published.get(node)
                if cur is not None and (cur.snapshot is snap or cur.version == snap.version):
                    continue
                try:
                    if self.consistency_check is not None:
                        self.consistency_check(snap)
                    staged[node] = self._index.index(snap, now)
                except InconsistentSnapshot as exc:
                    errors[node] = str(exc)
                except Exception as exc:  # the injected check reports by raising anything
                    errors[node] = str(exc) or type(exc).__name__
            if errors:
                self.metrics.snapshot_rejections.inc(len(errors))
                rejected = SnapshotRejected(errors)
                self.last_rejection = str(rejected)
                self.last_rejection_time = now
                log.error("snapshot rejected; keeping the previous one",
                          extra={"nodes": sorted(errors), "error": str(rejected)})
                raise rejected
            if not staged:
                return
            for node in staged:
                if node in self._published:
                    self._previous[node] = self._published[node]
            self._published.update(staged)
            self._index.prune(self._live())
            self.last_rejection = ""
            self.metrics.snapshots_published.inc(len(staged))
            for node in staged:
                woken.extend(self._watches.get(node, ()))
        for w in woken:
            w.wake()

    def clear_snapshot(self, node: str) -> None:
        """Forget a node's snapshot (its connected agents keep what they have)."""
        with self._lock:
            self._published.pop(node, None)
            self._previous.pop(node, None)
            self._index.prune(self._live())

    def _live(self) -> list[NodeResources]:
        return [*self._published.values(), *self._previous.values()]

    # ------------------------------------------------------------------ reading
    def get_snapshot(self, node: str) -> NodeSnapshot | None:
        nr = self._published.get(node)
        return nr.snapshot if nr is not None else None

    def resources(self, node: str) -> NodeResources | None:
        return self._published.get(node)

    def match_digest(self, node: str, digest: str) -> NodeResources | None:
        """The node's current or previous published resources whose digest is ``digest``."""
        for nr in (self._published.get(node), self._previous.get(node)):
            if nr is not None and nr.digest == digest:
                return nr
        return None

    def nodes(self) -> list[str]:
        return sorted(self._published)

    def versions(self) -> dict[str, str]:
        return {node: nr.version for node, nr in self._published.items()}

    def status(self, node: str) -> dict | None:
        st = self._status.get(node)
        if st is None:
            return None
        nr = self._published.get(node)
        return st.to_dict(nr.version if nr else "")

    def statuses(self) -> list[dict]:
        """One record per node that has a snapshot or has ever had an agent connected."""
        out = []
        for node in sorted(set(self._status) | set(self._published)):
            st = self._status.get(node) or AgentStatus(node)
            nr = self._published.get(node)
            out.append(st.to_dict(nr.version if nr else ""))
        return out

    def index_stats(self) -> dict[str, int]:
        return self._index.stats()

    # ------------------------------------------------------------------ new nodes
    async def ensure_snapshot(self, node: str) -> None:
        """Ask ``snapshot_for_new_node`` for a node without a snapshot (once at a time)."""
        if node in self._published or self.snapshot_for_new_node is None or node in self._pending_new:
            return
        self._pending_new.add(node)
        try:
            result = self.snapshot_for_new_node(node)
            if inspect.isawaitable(result):
                result = await result
            if isinstance(result, NodeSnapshot) and node not in self._published:
                self.set_snapshot(node, result)
        except SnapshotRejected:
            pass  # logged and counted by set_snapshots; the stream keeps waiting
        except Exception:
            log.exception("snapshot_for_new_node failed", extra={"node": node})
        finally:
            self._pending_new.discard(node)

    # ------------------------------------------------------------------ watches (server side)
    def watch(self, node: str) -> _Watch:
        w = _Watch(node)
        with self._lock:
            self._watches.setdefault(node, set()).add(w)
        return w

    def unwatch(self, w: _Watch) -> None:
        with self._lock:
            ws = self._watches.get(w.node)
            if ws is not None:
                ws.discard(w)
                if not ws:
                    del self._watches[w.node]

    # ------------------------------------------------------------------ agent status (server side)
    # The discovery server reports stream events here; it counts the metrics itself.
    def agent_connected(self, node: str, peer: str, agent_version: str) -> AgentStatus:
        st = self._status.get(node)
        if st is None:
            st = self._status[node] = AgentStatus(node)
        st.streams += 1
        st.peer = peer
        st.agent_version = agent_version
        st.connected_since = self.clock()
        st.disconnected_at = None
        return st

    def agent_disconnected(self, node: str) -> None:
        st = self._status.get(node)
        if st is None:
            return
        st.streams = max(0, st.streams - 1)
        if st.streams == 0:
            st.disconnected_at = self.clock()

    def record_sent(self, node: str, version: str) -> None:
        st = self._status[node]
        st.sent_version = version
        st.sent_at = self.clock()
        st.pushes += 1

    def record_ack(self, node: str, version: str, latency: float | None) -> None:
        st = self._status[node]
        st.acked_version = version
        st.acked_at = self.clock()
        if latency is not None:
            st.last_push_latency = latency
        if self._ack_waiters:
            for w in self._ack_waiters:
                if w.remaining.get(node) == version:
                    del w.remaining[node]
                    if not w.remaining and not w.future.done():
                        w.future.set_result(True)

    def record_nack(self, node: str, version: str, error: str) -> None:
        st = self._status[node]
        st.last_nack_error = error
        st.last_nack_version = version
        st.last_nack_time = self.clock()
        st.nacks += 1
        log.warning("agent rejected snapshot", extra={"node": node, "version": version, "error": error})

    async def wait_for_acks(self, versions: Mapping[str, str], timeout: float) -> bool:
        """Wait until every node in ``versions`` has ACKed exactly that version; False on timeout."""
        remaining = {n: v for n, v in versions.items()
                     if (st := self._status.get(n)) is None or st.acked_version != v}
        if not remaining:
            return True
        waiter = _AckWaiter(remaining, asyncio.get_running_loop().create_future())
        self._ack_waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._ack_waiters.remove(waiter)

    def pending_acks(self, versions: Mapping[str, str]) -> dict[str, str]:
        """node -> acked version of the nodes in ``versions`` that have not ACKed it."""
        return {n: (self._status[n].acked_version if n in self._status else "")
                for n, v in versions.items()
                if n not in self._status or self._status[n].acked_version != v}
