"""Endpoint health shared by the control-plane replicas through etcd.

An agent reports its node's unhealthy endpoints to the one replica it is connected to
(``controlplane/health.py``). With the etcd source every replica also writes those reports
to etcd and follows everyone's, so an agent connected to any replica skips an endpoint
another node's agent found down.

Key layout: ``<prefix>health/<node>`` (``/hostmesh/health/node1``), next to and outside
``<prefix>config/`` (the config source and ``config apply --prune`` never see it). The value
is JSON::

    {"node": "node1", "replica": "cp0", "reportedAt": "2024-05-01T10:00:00Z",
     "unhealthy": [["198.18.1.2", 8080, "default/web"], ...]}

Lifetimes:

* Every key is attached to a lease owned by the replica that wrote it (TTL: the replica's
  ``--leader-ttl``, 5 s by default), refreshed every TTL/3. A replica that dies takes its
  entries with it once the lease runs out; one that loses etcd for longer than the TTL
  writes its agents' reports again under a new lease. A clean stop does not revoke it: the
  agents fail over to another replica and report there before the old entries lapse.
* The key is written when an agent connected here reports (also an empty set: the agent's
  newest word wins over an older entry of another replica), so the last replica to hear
  from an agent owns its node's key.
* When the agent's stream ends the entry stays for the store's disconnect grace, then this
  replica deletes it, only if it is still the one it wrote (a transaction comparing the
  key's mod revision): an agent that has moved to another replica keeps its newer entry.

Reading: list the prefix, then watch from the next revision (relisted on compaction or a
broken stream). Each value is checked (``decode_report``): a node name that fits the key, at
most ``MAX_SHARED_ENTRIES`` endpoints, each an IP address, a port and "ns/service"; anything
else is skipped with a log line and ``hostmesh_controlplane_health_skipped_values_total``,
never raised. At most ``MAX_SHARED_NODES`` nodes are held. The store checks the endpoints
against the current model again before anything reaches an agent.

``HealthSyncState`` (reads) and ``HealthWrites`` (writes owed) are plain objects without
I/O; ``HealthSync`` drives them against etcd.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aetcd import rpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from controlplane.etcd import DEFAULT_PREFIX, Compacted, EtcdClient, EtcdError, delete_op, put_op
from controlplane.health import EndpointKey, HealthStore, SharedReport, iso
from controlplane.sources.etcd import backoff

log = logging.getLogger("hostmesh.controlplane.healthsync")

MAX_VALUE_BYTES = 1 << 20        # below etcd's default request limit (1.5 MiB)
MAX_SHARED_ENTRIES = 4096        # endpoints in one node's entry
MAX_SHARED_NODES = 20000         # nodes' entries held (Kubernetes' own limit is 5000 nodes)
MAX_NODE_NAME = 253
MAX_SERVICE_REF = 253
MAX_TXN_OPS = 64                 # puts per transaction (etcd's default limit is 128)


def health_prefix(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix.rstrip('/')}/health/"


def health_key(prefix: str, node: str) -> str:
    return f"{health_prefix(prefix)}{node}"


def valid_node_name(node: str) -> bool:
    return 0 < len(node) <= MAX_NODE_NAME and "/" not in node and not any(c.isspace() for c in node)


def encode_report(node: str, keys: Iterable[EndpointKey], replica: str, reported_at: float) -> bytes:
    """The etcd value of a node's report; past ``MAX_SHARED_ENTRIES`` (or the byte limit) the
    list is cut, in sorted order (the store keeps the whole set for this replica's agents)."""
    entries = sorted([a, p, s] for a, p, s in keys)[:MAX_SHARED_ENTRIES]
    while True:
        body = json.dumps({"node": node, "replica": replica, "reportedAt": iso(reported_at), "unhealthy": entries},
                          separators=(",", ":")).encode()
        if len(body) <= MAX_VALUE_BYTES or not entries:
            return body
        entries = entries[:len(entries) // 2]


def decode_report(prefix: str, key: str, data: bytes, revision: int) -> tuple[str, SharedReport | None, str]:
    """(node, report, "") for a valid entry, else (node or "", None, why it was skipped)."""
    hp = health_prefix(prefix)
    node = key[len(hp):] if key.startswith(hp) else ""
    if not valid_node_name(node):
        return "", None, f"not a health key (want {hp}<node>, a node name without '/' or spaces)"
    if len(data) > MAX_VALUE_BYTES:
        return node, None, f"value of {len(data)} bytes, over the {MAX_VALUE_BYTES} allowed"
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return node, None, f"not JSON: {exc}"
    if not isinstance(doc, dict):
        return node, None, "not a JSON object"
    if doc.get("node", node) != node:
        return node, None, f"names node {doc.get('node')!r}, but its key names {node!r}"
    replica, reported_at, items = doc.get("replica"), doc.get("reportedAt", ""), doc.get("unhealthy")
    if not isinstance(replica, str) or not replica:
        return node, None, "replica: missing or not a string"
    if not isinstance(reported_at, str):
        return node, None, "reportedAt: not a string"
    if not isinstance(items, list):
        return node, None, "unhealthy: missing or not a list"
    if len(items) > MAX_SHARED_ENTRIES:
        return node, None, f"unhealthy: {len(items)} endpoints, over the {MAX_SHARED_ENTRIES} allowed"
    keys = set()
    for i, item in enumerate(items):
        why = _entry_problem(item)
        if why:
            return node, None, f"unhealthy[{i}]: {why}"
        keys.add((item[0], item[1], item[2]))
    return node, SharedReport(frozenset(keys), replica, reported_at[:64], revision), ""


def _entry_problem(item) -> str:
    if not isinstance(item, list) or len(item) != 3:
        return "not [address, port, \"namespace/service\"]"
    address, port, service = item
    try:
        if not isinstance(address, str):
            raise ValueError
        ipaddress.ip_address(address)
    except ValueError:
        return f"address {address!r} is not an IP address"
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return f"port {port!r} is not 1-65535"
    if (not isinstance(service, str) or len(service) > MAX_SERVICE_REF or service.count("/") != 1
            or not all(service.split("/"))):
        return f"service {service!r} is not namespace/name"
    return ""


# ---------------------------------------------------------------------- reads (no I/O)
class HealthSyncState:
    """The health prefix as last read from etcd, fed into the store's etcd entries."""

    def __init__(self, store: HealthStore, prefix: str = DEFAULT_PREFIX, *, max_nodes: int = MAX_SHARED_NODES) -> None:
        self.store = store
        self.prefix = prefix
        self.max_nodes = max_nodes
        self.revision = 0
        self.skipped: dict[str, tuple[int, str]] = {}   # key -> (its mod revision, why)

    def reset(self, revision: int, kvs: Iterable) -> int:
        """A full list at ``revision``; returns how many values were newly skipped."""
        self.revision = revision
        reports: dict[str, SharedReport] = {}
        fresh, skipped = 0, {}
        for kv in kvs:
            key = kv.key.decode("utf-8", "replace")
            node, report, why = decode_report(self.prefix, key, kv.value, kv.mod_revision)
            if not why and node not in reports and len(reports) >= self.max_nodes:
                why = f"over {self.max_nodes} nodes' health entries"
            if why:
                fresh += self._skip(key, kv.mod_revision, why)
                skipped[key] = (kv.mod_revision, why)
            else:
                reports[node] = report
        self.skipped = skipped
        self.store.replace_shared(reports)
        return fresh

    def apply(self, revision: int, events: Iterable) -> int:
        """The events of one watch response (type 0 PUT, 1 DELETE); returns new skips."""
        self.revision = revision
        fresh = 0
        for ev in events:
            key = ev.kv.key.decode("utf-8", "replace")
            if ev.type == 1:
                self.skipped.pop(key, None)
                node = key[len(health_prefix(self.prefix)):]
                if valid_node_name(node):
                    self.store.set_shared(node, None)
                continue
            node, report, why = decode_report(self.prefix, key, ev.kv.value, ev.kv.mod_revision)
            if (not why and self.store.shared(node) is None
                    and self.store.shared_count() >= self.max_nodes):
                why = f"over {self.max_nodes} nodes' health entries"
            if why:
                fresh += self._skip(key, ev.kv.mod_revision, why)
                self.skipped[key] = (ev.kv.mod_revision, why)
                if node:
                    self.store.set_shared(node, None)   # no trustworthy word on this node: fail open
                continue
            self.skipped.pop(key, None)
            self.store.set_shared(node, report)
        return fresh

    def _skip(self, key: str, revision: int, why: str) -> int:
        if self.skipped.get(key) == (revision, why):
            return 0     # the same value seen again (a relist): logged and counted already
        log.error("malformed endpoint health value in etcd skipped", extra={"key": key, "error": why})
        return 1


# ---------------------------------------------------------------------- writes (no I/O)
@dataclass(frozen=True, slots=True)
class HealthPut:
    node: str
    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class HealthDelete:
    node: str
    key: str
    revision: int    # delete only while the key still has this mod revision (our write)


class HealthWrites:
    """What this replica owes etcd: the reports of the agents connected to it."""

    def __init__(self, store: HealthStore, prefix: str = DEFAULT_PREFIX) -> None:
        self.store = store
        self.prefix = prefix
        self._dirty: set[str] = set()
        self._written: dict[str, int] = {}    # node -> mod revision of our last put

    @property
    def pending(self) -> bool:
        return bool(self._dirty)

    def mark(self, node: str) -> None:
        self._dirty.add(node)

    def lease_lost(self) -> None:
        """The lease (and every key on it) is gone: write what open streams reported again.
        Reports in their grace are not rewritten: their agents may be another replica's now."""
        self._written.clear()
        self._dirty.update(n for n in self.store.local_nodes() if self.store.local(n).live)

    def take(self, limit: int = MAX_TXN_OPS) -> tuple[list[HealthPut], list[HealthDelete]]:
        """Up to ``limit`` dirty nodes as the writes they need now."""
        puts, deletes = [], []
        for node in sorted(self._dirty)[:limit]:
            self._dirty.discard(node)
            rep = self.store.local(node)
            key = health_key(self.prefix, node)
            if rep is not None and rep.live:
                puts.append(HealthPut(node, key, encode_report(node, rep.keys, self.store.replica, rep.received_at)))
            elif rep is None and node in self._written:
                deletes.append(HealthDelete(node, key, self._written[node]))
            # a report in its grace: the key stays as written until the grace ends
        return puts, deletes

    def put_done(self, puts: Iterable[HealthPut], revision: int) -> None:
        for p in puts:
            self._written[p.node] = revision

    def delete_done(self, delete: HealthDelete) -> None:
        if self._written.get(delete.node) == delete.revision:
            del self._written[delete.node]

    def failed(self, nodes: Iterable[str]) -> None:
        self._dirty.update(nodes)

    def written(self, node: str) -> int | None:
        return self._written.get(node)


# ---------------------------------------------------------------------- metrics
class HealthMetrics:
    """The control plane's endpoint-health series (docs/ARCHITECTURE.md, control-plane metrics)."""

    def __init__(self, registry: CollectorRegistry, store: HealthStore, *, etcd: bool = False) -> None:
        self.reports = Gauge("hostmesh_controlplane_health_reports",
                             "Nodes whose endpoint health report this replica holds, by where it came from "
                             "(local: an agent connected here, during the disconnect grace too; etcd: another "
                             "replica's entry)", ["source"], registry=registry)
        self.reports.labels("local").set_function(lambda: store.counts()["local"])
        self.reports.labels("etcd").set_function(lambda: store.counts()["etcd"])
        self.unhealthy = Gauge("hostmesh_controlplane_health_unhealthy_endpoints",
                               "Endpoints in the EndpointHealth objects pushed to the agents", registry=registry)
        self.unhealthy.set_function(lambda: store.published_endpoints)
        self.expired = Counter("hostmesh_controlplane_health_reports_expired",
                               "Reports dropped because the agent stream that carried them ended longer than "
                               "the grace ago", registry=registry)
        if etcd:
            self.skipped = Counter("hostmesh_controlplane_health_skipped_values",
                                   "Health values in etcd skipped as malformed or over the size bounds",
                                   registry=registry)
            self.write_errors = Counter("hostmesh_controlplane_health_etcd_write_errors",
                                        "Health writes to etcd that failed (retried)", registry=registry)
            self.synced = Gauge("hostmesh_controlplane_health_etcd_synced",
                                "1 while the health prefix is watched and this replica holds its health lease",
                                registry=registry)


# ---------------------------------------------------------------------- the etcd driver
def mod_revision_is(key: str, revision: int) -> rpc.Compare:
    return rpc.Compare(key=key.encode(), target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=revision)


class HealthSync:
    """Writes this replica's agents' reports to etcd and follows every replica's."""

    def __init__(self, client: EtcdClient, store: HealthStore, metrics: HealthMetrics, *,
                 prefix: str = DEFAULT_PREFIX, ttl: int = 5, on_change: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl < 2:
            raise ValueError("the health lease TTL must be at least 2 s")
        self.client = client
        self.store = store
        self.metrics = metrics
        self.prefix = prefix
        self.ttl = ttl
        self.on_change = on_change   # the merged view changed because of etcd: publish
        self.clock = clock
        self.state = HealthSyncState(store, prefix)
        self.writes = HealthWrites(store, prefix)
        self.lease = 0
        self.watching = False
        self.last_error = ""
        self._wake = asyncio.Event()
        self._watch_attempt = 0

    def mark(self, node: str) -> None:
        """``node``'s local report changed (or its grace ended): write it (or delete it) soon."""
        self.writes.mark(node)
        self._wake.set()

    def describe(self) -> dict:
        return {"prefix": health_prefix(self.prefix), "replica": self.store.replica, "ttl": self.ttl,
                "lease": f"{self.lease:x}" if self.lease else None, "watching": self.watching,
                "revision": self.state.revision, "last_error": self.last_error or None,
                "skipped": [{"key": k, "error": why} for k, (_, why) in sorted(self.state.skipped.items())]}

    def _synced(self) -> None:
        self.metrics.synced.set(1 if self.watching and self.lease else 0)

    def _error(self, what: str, exc: Exception) -> None:
        first = self.last_error != str(exc)
        self.last_error = str(exc)
        if first:
            log.warning(what, extra={"error": str(exc)})

    async def initial_load(self) -> None:
        """One list before the agents are served, so they get the other replicas' reports at once."""
        try:
            await self._list()
        except EtcdError as exc:
            self._error("could not read the shared endpoint health from etcd; retrying", exc)

    async def run(self) -> None:
        await asyncio.gather(self._follow(), self._keep_lease(), self._write())

    async def close(self) -> None:
        await self.client.close()

    # ------------------------------------------------------------------ reads
    async def _list(self) -> None:
        revision, kvs = await self.client.get_prefix(health_prefix(self.prefix))
        before = self.store.version
        self.metrics.skipped.inc(self.state.reset(revision, kvs))
        self.watching, self._watch_attempt = True, 0
        self._synced()
        if self.store.version != before:
            self.on_change()

    async def _follow(self) -> None:
        while True:
            try:
                if not self.watching:
                    await self._list()
                async for resp in self.client.watch_prefix(health_prefix(self.prefix), self.state.revision + 1):
                    before = self.store.version
                    self.metrics.skipped.inc(self.state.apply(resp.header.revision, resp.events))
                    if self.store.version != before:
                        self.on_change()
            except Compacted:
                self.watching = False
            except EtcdError as exc:
                self.watching = False
                self._synced()
                self._error("the shared endpoint health watch broke; listing again", exc)
                await asyncio.sleep(backoff(self._watch_attempt))
                self._watch_attempt += 1

    # ------------------------------------------------------------------ the lease
    async def _keep_lease(self) -> None:
        valid_until, attempt = 0.0, 0
        while True:
            try:
                if not self.lease:
                    granted_at = self.clock()
                    self.lease = await self.client.grant(self.ttl)
                    valid_until = granted_at + self.ttl
                    self.writes.lease_lost()
                    self._wake.set()
                    self._synced()
                await asyncio.sleep(self.ttl / 3)
                sent = self.clock()
                left = await asyncio.wait_for(self.client.keepalive(self.lease), self.ttl / 3)
                if left <= 0:
                    log.warning("the health lease expired; writing the reports again under a new one",
                                extra={"lease": f"{self.lease:x}"})
                    self.lease = 0
                    continue
                valid_until, attempt = sent + left, 0
            except (EtcdError, asyncio.TimeoutError) as exc:
                self._error("could not refresh the health lease in etcd", exc if str(exc) else
                            EtcdError("health lease refresh timed out"))
                if self.lease and self.clock() >= valid_until:
                    self.lease = 0     # etcd has dropped our entries by now
                    self._synced()
                await asyncio.sleep(backoff(attempt))
                attempt += 1

    # ------------------------------------------------------------------ writes
    async def _write(self) -> None:
        attempt = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.lease and self.writes.pending:
                puts, deletes = self.writes.take()
                try:
                    if puts:
                        resp = await self.client.txn([], [put_op(p.key, p.value, self.lease) for p in puts])
                        self.writes.put_done(puts, resp.header.revision)
                        puts = []
                    while deletes:
                        d = deletes[0]
                        await self.client.txn([mod_revision_is(d.key, d.revision)], [delete_op(d.key)])
                        self.writes.delete_done(d)   # refused: another replica's entry now; nothing owed
                        deletes.pop(0)
                    attempt = 0
                except EtcdError as exc:
                    self.metrics.write_errors.inc()
                    self.writes.failed([p.node for p in puts] + [d.node for d in deletes])
                    self._error("could not write endpoint health to etcd; retrying", exc)
                    await asyncio.sleep(backoff(attempt))
                    attempt += 1
