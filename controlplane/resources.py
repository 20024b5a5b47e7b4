"""A node snapshot as named, individually versioned resources, and their wire encoding.

A ``NodeSnapshot`` (nodeagent/state.py) is split into resources named

    service/<namespace>/<name>
    workload/<namespace>/<name>
    config/<Kind>/<namespace>/<name>

each with a version: the first 16 hex digits of the SHA-256 of its kind and its
deterministic protobuf encoding. Only resources travel on the wire; the snapshot
version is ``NodeSnapshot.version`` as the builder made it.

Sharing (why the server stays cheap with 1000 agents): nodes' snapshots overlap almost
entirely, so ``ResourceIndex`` encodes every resource version once and every agent's
update is a concatenation of those shared bytes (protobuf allows a message to be
assembled from already encoded fields, see ``encode_update``). The index also groups a
snapshot's resources per kind (``ResourceGroup``); a tuple object that several node
snapshots share (``snap.services``) is indexed once, and the difference between two
groups is computed once and reused by every agent that moves from one to the other.
Builders get the best performance by reusing the same tuple objects (and the same
Service/Workload objects) across nodes and across rebuilds when nothing changed; equal
content built as new objects is still recognised, at the cost of one dictionary lookup
per resource per node.

Digest: ``resource_digest`` hashes the complete (name, version) set, per kind and then
over the kinds, so the control plane computes it from per-group digests in O(1) per
node and the agent from its own resource map; a mismatch means the agent's delta state
drifted and it resyncs.
"""

from __future__ import annotations

import hashlib
import itertools
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from controlplane.api import discovery_pb2 as pb
from nodeagent.state import (
    ConfigObject,
    Endpoint,
    NodeSnapshot,
    Service,
    ServicePort,
    Workload,
)

SERVICE = "service"
WORKLOAD = "workload"
CONFIG = "config"
#: Group order inside a NodeResources (and the snapshot field each kind comes from).
KINDS: tuple[str, ...] = (SERVICE, WORKLOAD, CONFIG)
_FIELD = {SERVICE: "services", WORKLOAD: "workloads", CONFIG: "config"}

ResourceObject = Union[Service, Workload, ConfigObject]


class InconsistentSnapshot(ValueError):
    """A snapshot that cannot be published (e.g. two resources with the same name)."""


# ------------------------------------------------------------------------- naming

def resource_name(obj: ResourceObject) -> str:
    if isinstance(obj, Service):
        return f"{SERVICE}/{obj.namespace}/{obj.name}"
    if isinstance(obj, Workload):
        return f"{WORKLOAD}/{obj.namespace}/{obj.name}"
    if isinstance(obj, ConfigObject):
        return f"{CONFIG}/{obj.kind}/{obj.namespace}/{obj.name}"
    raise TypeError(f"not a snapshot resource: {type(obj).__name__}")


def kind_of(name: str) -> str:
    return name.split("/", 1)[0]


# ------------------------------------------------------------------------- proto conversion

def service_to_proto(s: Service) -> pb.Service:
    return pb.Service(
        name=s.name, namespace=s.namespace, cluster_ip=s.cluster_ip,
        ports=[pb.ServicePort(port=p.port, target_port=p.target_port, name=p.name, protocol=p.protocol,
                              app_protocol=p.app_protocol) for p in s.ports],
        endpoints=[pb.Endpoint(address=e.address, port=e.port, node=e.node, workload=e.workload,
                               namespace=e.namespace) for e in s.endpoints],
    )


def workload_to_proto(w: Workload) -> pb.Workload:
    return pb.Workload(name=w.name, namespace=w.namespace, node=w.node, address=w.address,
                       service_account=w.service_account,
                       labels=[pb.Label(key=k, value=v) for k, v in w.labels])


def config_to_proto(c: ConfigObject) -> pb.ConfigObject:
    return pb.ConfigObject(kind=c.kind, namespace=c.namespace, name=c.name, spec_json=c.spec)


def service_from_proto(m: pb.Service) -> Service:
    return Service(
        name=m.name, namespace=m.namespace, cluster_ip=m.cluster_ip,
        ports=tuple(ServicePort(port=p.port, target_port=p.target_port, name=p.name, protocol=p.protocol,
                                app_protocol=p.app_protocol) for p in m.ports),
        endpoints=tuple(Endpoint(address=e.address, port=e.port, node=e.node, workload=e.workload,
                                 namespace=e.namespace) for e in m.endpoints),
    )


def workload_from_proto(m: pb.Workload) -> Workload:
    return Workload(name=m.name, namespace=m.namespace, node=m.node, address=m.address,
                    service_account=m.service_account, labels=tuple((lb.key, lb.value) for lb in m.labels))


def config_from_proto(m: pb.ConfigObject) -> ConfigObject:
    return ConfigObject(kind=m.kind, namespace=m.namespace, name=m.name, spec=m.spec_json)


def body_to_proto(obj: ResourceObject):
    if isinstance(obj, Service):
        return SERVICE, service_to_proto(obj)
    if isinstance(obj, Workload):
        return WORKLOAD, workload_to_proto(obj)
    if isinstance(obj, ConfigObject):
        return CONFIG, config_to_proto(obj)
    raise TypeError(f"not a snapshot resource: {type(obj).__name__}")


def resource_to_proto(obj: ResourceObject, version: str | None = None) -> pb.Resource:
    kind, body = body_to_proto(obj)
    if version is None:
        version = _version(kind, body.SerializeToString(deterministic=True))
    return pb.Resource(name=resource_name(obj), version=version, **{kind: body})


def resource_from_proto(r: pb.Resource) -> ResourceObject:
    """The dataclass of a wire resource; raises ValueError when the body is missing or misnamed."""
    which = r.WhichOneof("body")
    if which == SERVICE:
        obj = service_from_proto(r.service)
    elif which == WORKLOAD:
        obj = workload_from_proto(r.workload)
    elif which == CONFIG:
        obj = config_from_proto(r.config)
    else:
        raise ValueError(f"resource {r.name!r}: no body")
    if resource_name(obj) != r.name:
        raise ValueError(f"resource {r.name!r}: body is named {resource_name(obj)!r}")
    return obj


def resource_to_dict(r: pb.Resource) -> tuple[str, dict[str, Any]]:
    """(snapshot field, plain dict in NodeSnapshot.to_dict() shape) of a wire resource, for
    validation through ``NodeSnapshot.from_dict``."""
    which = r.WhichOneof("body")
    if which == SERVICE:
        m = r.service
        return "services", {
            "name": m.name, "namespace": m.namespace, "cluster_ip": m.cluster_ip,
            "ports": [{"port": p.port, "target_port": p.target_port, "name": p.name, "protocol": p.protocol,
                       "app_protocol": p.app_protocol} for p in m.ports],
            "endpoints": [{"address": e.address, "port": e.port, "node": e.node, "workload": e.workload,
                           "namespace": e.namespace} for e in m.endpoints],
        }
    if which == WORKLOAD:
        m = r.workload
        return "workloads", {"name": m.name, "namespace": m.namespace, "node": m.node, "address": m.address,
                             "service_account": m.service_account,
                             "labels": [[lb.key, lb.value] for lb in m.labels]}
    if which == CONFIG:
        m = r.config
        return "config", {"kind": m.kind, "namespace": m.namespace, "name": m.name, "spec": m.spec_json}
    raise ValueError(f"resource {r.name!r}: no body")


def _version(kind: str, body: bytes) -> str:
    return hashlib.sha256(kind.encode() + b"\0" + body).hexdigest()[:16]


def version_of(obj: ResourceObject) -> str:
    kind, body = body_to_proto(obj)
    return _version(kind, body.SerializeToString(deterministic=True))


# ------------------------------------------------------------------------- split / merge

def split(snapshot: NodeSnapshot) -> dict[str, tuple[str, ResourceObject]]:
    """name -> (version, object) of every resource of a snapshot (uncached; the agent side).

    Raises InconsistentSnapshot when two resources share a name."""
    out: dict[str, tuple[str, ResourceObject]] = {}
    for obj in itertools.chain(snapshot.services, snapshot.workloads, snapshot.config):
        name = resource_name(obj)
        if name in out:
            raise InconsistentSnapshot(f"node {snapshot.node}: duplicate resource {name}")
        out[name] = (version_of(obj), obj)
    return out


def merge(node: str, version: str, objects: Iterable[ResourceObject]) -> NodeSnapshot:
    """A NodeSnapshot from resource objects, each kind ordered by resource name."""
    by_kind: dict[str, list[tuple[str, ResourceObject]]] = {k: [] for k in KINDS}
    for obj in objects:
        by_kind[kind_of(resource_name(obj))].append((resource_name(obj), obj))
    parts = {k: tuple(o for _, o in sorted(v, key=lambda t: t[0])) for k, v in by_kind.items()}
    return NodeSnapshot(node=node, services=parts[SERVICE], workloads=parts[WORKLOAD], config=parts[CONFIG],
                        version=version)


def group_digest(items: Iterable[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, version in sorted(items):
        h.update(f"{name}\0{version}\n".encode())
    return h.hexdigest()


def combine_digests(per_kind: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for kind in sorted(per_kind):
        h.update(f"{kind}={per_kind[kind]}\n".encode())
    return h.hexdigest()[:32]


#: Anti-entropy buckets: a reconnecting agent sends one short digest per bucket and
#: uploads only the versions of the buckets that differ.
BUCKETS = 64
BUCKET_DIGEST_BYTES = 8


def bucket_of(name: str) -> int:
    return zlib.crc32(name.encode()) % BUCKETS


def _bucket_hash(lines: Iterable[tuple[str, str]]) -> bytes:
    h = hashlib.sha256()
    for name, version in lines:
        h.update(f"{name}\0{version}\n".encode())
    return h.digest()[:BUCKET_DIGEST_BYTES]


def bucket_digests(versions: Mapping[str, str]) -> bytes:
    """BUCKETS x 8 bytes: the digest of the (name, version) lines of each bucket, sorted by name."""
    buckets: list[list[tuple[str, str]]] = [[] for _ in range(BUCKETS)]
    for name, version in versions.items():
        buckets[bucket_of(name)].append((name, version))
    return b"".join(_bucket_hash(sorted(b)) for b in buckets)


def differing_buckets(a: bytes, b: bytes) -> list[int]:
    n = BUCKET_DIGEST_BYTES
    return [i for i in range(BUCKETS) if a[i * n:(i + 1) * n] != b[i * n:(i + 1) * n]]


def resource_digest(versions: Mapping[str, str]) -> str:
    """Digest of a complete name -> version set (what SnapshotUpdate.resource_digest carries)."""
    per_kind: dict[str, list[tuple[str, str]]] = {}
    for name, version in versions.items():
        per_kind.setdefault(kind_of(name), []).append((name, version))
    return combine_digests({k: group_digest(v) for k, v in per_kind.items()})


# ------------------------------------------------------------------------- wire helpers

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _ld(field_number: int, data: bytes) -> bytes:
    """One length-delimited field (string, bytes or message) in protobuf wire format."""
    return _varint(field_number << 3 | 2) + _varint(len(data)) + data


_RESOURCE_BODY_FIELD = {SERVICE: 3, WORKLOAD: 4, CONFIG: 5}
_UPDATE_CHANGED = 3
_UPDATE_REMOVED = 4


class Entry:
    """One resource version, encoded once: ``field`` is a complete ``SnapshotUpdate.changed``
    element (tag, length, Resource) ready to be concatenated into any agent's update."""

    __slots__ = ("bucket", "field", "kind", "name", "obj", "version")

    def __init__(self, name: str, kind: str, version: str, field: bytes, obj: ResourceObject) -> None:
        self.name = name
        self.kind = kind
        self.version = version
        self.field = field
        self.obj = obj
        self.bucket = bucket_of(name)

    @classmethod
    def build(cls, obj: ResourceObject) -> Entry:
        kind, body = body_to_proto(obj)
        body_bytes = body.SerializeToString(deterministic=True)
        version = _version(kind, body_bytes)
        name = resource_name(obj)
        resource = _ld(1, name.encode()) + _ld(2, version.encode()) + _ld(_RESOURCE_BODY_FIELD[kind], body_bytes)
        return cls(name, kind, version, _ld(_UPDATE_CHANGED, resource), obj)


_uids = itertools.count(1)


@dataclass(frozen=True)
class GroupDiff:
    changed: int
    removed: int
    body: bytes


_EMPTY_DIFF = GroupDiff(0, 0, b"")


class ResourceGroup:
    """The resources of one kind of one (or several identical) node snapshots. Immutable."""

    __slots__ = ("__weakref__", "_buckets", "_diffs", "_full", "digest", "entries", "kind", "uid")

    def __init__(self, kind: str, entries: dict[str, Entry]) -> None:
        self.uid = next(_uids)
        self.kind = kind
        self.entries = entries
        self.digest = group_digest((n, e.version) for n, e in entries.items())
        self._full: bytes | None = None
        # uid of a previous group -> diff from it to this one (no reference to the old group)
        self._diffs: dict[int, GroupDiff] = {}
        self._buckets: list[list[Entry]] | None = None

    def by_bucket(self) -> list[list[Entry]]:
        """Entries per anti-entropy bucket, each sorted by name (lazy)."""
        if self._buckets is None:
            buckets: list[list[Entry]] = [[] for _ in range(BUCKETS)]
            for name in sorted(self.entries):
                e = self.entries[name]
                buckets[e.bucket].append(e)
            self._buckets = buckets
        return self._buckets

    def full_body(self) -> bytes:
        if self._full is None:
            self._full = b"".join(e.field for e in self.entries.values())
        return self._full

    def diff_from(self, old: ResourceGroup | None) -> GroupDiff:
        """Changed and removed resources going from ``old`` to this group; memoized."""
        if old is self:
            return _EMPTY_DIFF
        if old is None:
            return GroupDiff(len(self.entries), 0, self.full_body())
        d = self._diffs.get(old.uid)
        if d is None:
            old_entries = old.entries
            changed = [e for n, e in self.entries.items()
                       if (o := old_entries.get(n)) is None or o.version != e.version]
            removed = [n for n in old_entries if n not in self.entries]
            d = GroupDiff(len(changed), len(removed),
                          b"".join(e.field for e in changed) + b"".join(_ld(_UPDATE_REMOVED, n.encode())
                                                                         for n in removed))
            if len(self._diffs) >= 16:
                self._diffs.pop(next(iter(self._diffs)))
            self._diffs[old.uid] = d
        return d


class NodeResources:
    """A published node snapshot as resource groups (one per kind, order ``KINDS``)."""

    __slots__ = ("_versions", "digest", "groups", "node", "published_at", "snapshot", "version")

    def __init__(self, snapshot: NodeSnapshot, groups: tuple[ResourceGroup, ...], published_at: float) -> None:
        self.node = snapshot.node
        self.version = snapshot.version
        self.snapshot = snapshot
        self.groups = groups
        self.digest = combine_digests({g.kind: g.digest for g in groups if g.entries})
        self.published_at = published_at
        self._versions: dict[str, str] | None = None

    def __len__(self) -> int:
        return sum(len(g.entries) for g in self.groups)

    def versions(self) -> dict[str, str]:
        if self._versions is None:
            self._versions = {n: e.version for g in self.groups for n, e in g.entries.items()}
        return self._versions

    def full_body(self) -> bytes:
        return b"".join(g.full_body() for g in self.groups)

    def bucket_digests(self) -> bytes:
        """Same value as ``bucket_digests(self.versions())``, shared by every node whose
        snapshot has the same groups."""
        key = tuple(g.uid for g in self.groups)
        hit = _BUCKET_DIGESTS.get(key)
        if hit is None:
            groups = sorted(self.groups, key=lambda g: g.kind)  # == global name order
            per_group = [g.by_bucket() for g in groups]
            hit = b"".join(_bucket_hash((e.name, e.version) for gb in per_group for e in gb[b])
                           for b in range(BUCKETS))
            if len(_BUCKET_DIGESTS) >= 64:
                _BUCKET_DIGESTS.pop(next(iter(_BUCKET_DIGESTS)))
            _BUCKET_DIGESTS[key] = hit
        return hit


_BUCKET_DIGESTS: dict[tuple[int, ...], bytes] = {}


@dataclass(frozen=True)
class Delta:
    """What an update carries: counts for metrics and the encoded changed/removed fields
    as shared byte strings (``parts``); ``size`` is known before anything is copied."""

    changed: int
    removed: int
    parts: tuple[bytes, ...]
    full_state: bool = False

    @property
    def size(self) -> int:
        return sum(map(len, self.parts))


def delta(old: NodeResources | Mapping[str, str] | None, new: NodeResources, *, full_state: bool = False,
          buckets: Iterable[int] | None = None) -> Delta:
    """The update that takes an agent holding ``old`` to ``new``.

    ``old`` is what the agent holds: the NodeResources it ACKed last (memoized group
    diffs, nothing computed per agent), or the name -> version map it declared (any
    Mapping, e.g. the Hello's protobuf map, read without copying), or None when unknown
    or empty: then everything is sent with ``full_state``. With ``buckets``, ``old``
    lists only the resources of those buckets and every other bucket is known equal."""
    if full_state or old is None:
        return Delta(len(new), 0, tuple(g.full_body() for g in new.groups), True)
    if isinstance(old, NodeResources):
        changed = removed = 0
        parts = []
        for g, og in zip(new.groups, old.groups, strict=True):
            d = g.diff_from(og)
            changed += d.changed
            removed += d.removed
            parts.append(d.body)
        return Delta(changed, removed, tuple(parts))
    get = old.get
    changed = 0
    parts: list[bytes] = []
    if buckets is not None:
        wanted = sorted(set(buckets))
        for g in new.groups:
            gb = g.by_bucket()
            fields = [e.field for b in wanted for e in gb[b] if get(e.name) != e.version]
            changed += len(fields)
            parts.extend(fields)
    elif not len(old):
        return Delta(len(new), 0, tuple(g.full_body() for g in new.groups), True)
    else:
        for g in new.groups:
            fields = [e.field for n, e in g.entries.items() if get(n) != e.version]
            changed += len(fields)
            parts.extend(fields)
    by_kind = {g.kind: g.entries for g in new.groups}
    empty: dict = {}
    gone = [n for n in old if n not in by_kind.get(kind_of(n), empty)]
    parts.extend(_ld(_UPDATE_REMOVED, n.encode()) for n in gone)
    return Delta(changed, len(gone), tuple(parts))


def encode_update(nonce: str, new: NodeResources, d: Delta) -> bytes:
    """A complete serialized SnapshotUpdate: per-agent header + the shared encoded body,
    joined in one copy."""
    header = _ld(1, nonce.encode()) + _ld(2, new.version.encode())
    if d.full_state:
        header += b"\x28\x01"  # field 5 (full_state), varint true
    header += _ld(6, new.digest.encode())
    return b"".join((header, *d.parts))


# ------------------------------------------------------------------------- the shared index

class ResourceIndex:
    """Turns published NodeSnapshots into NodeResources, sharing entries and groups.

    Not thread safe: the cache calls it under its lock."""

    def __init__(self) -> None:
        # id(tuple) -> (tuple, group): the tuple is held so its id stays unique
        self._by_tuple: dict[int, tuple[tuple, ResourceGroup]] = {}
        # (kind, entries...) -> group: equal content built from other tuple objects
        self._by_key: dict[tuple, ResourceGroup] = {}
        # id(obj) -> (obj, entry), and (name, version) -> entry
        self._by_obj: dict[int, tuple[Any, Entry]] = {}
        self._by_nv: dict[tuple[str, str], Entry] = {}

    def index(self, snapshot: NodeSnapshot, published_at: float) -> NodeResources:
        groups = tuple(self._group(kind, getattr(snapshot, _FIELD[kind]), snapshot.node) for kind in KINDS)
        return NodeResources(snapshot, groups, published_at)

    def _group(self, kind: str, items: tuple, node: str) -> ResourceGroup:
        hit = self._by_tuple.get(id(items))
        if hit is not None and hit[0] is items:
            return hit[1]
        entries = [self._entry(obj) for obj in items]
        key = (kind, *entries)
        group = self._by_key.get(key)
        if group is None:
            by_name = {e.name: e for e in entries}
            if len(by_name) != len(entries):
                seen: set[str] = set()
                dup = next(e.name for e in entries if e.name in seen or seen.add(e.name))
                raise InconsistentSnapshot(f"node {node}: duplicate resource {dup}")
            for e in entries:
                if e.kind != kind:
                    raise InconsistentSnapshot(f"node {node}: {e.name} is not a {kind}")
            group = ResourceGroup(kind, by_name)
            self._by_key[key] = group
        self._by_tuple[id(items)] = (items, group)
        return group

    def _entry(self, obj: Any) -> Entry:
        hit = self._by_obj.get(id(obj))
        if hit is not None:
            return hit[1]
        try:
            e = Entry.build(obj)
        except TypeError as exc:
            raise InconsistentSnapshot(str(exc)) from None
        shared = self._by_nv.get((e.name, e.version))
        if shared is not None:
            e = shared
        else:
            self._by_nv[(e.name, e.version)] = e
        self._by_obj[id(obj)] = (obj, e)
        return e

    def prune(self, live: Iterable[NodeResources]) -> None:
        """Forget what no published snapshot uses any more (objects and entries only when the
        tables doubled, so the cost is amortized)."""
        live = list(live)
        live_groups = {id(g): g for nr in live for g in nr.groups}
        live_tuples = {id(getattr(nr.snapshot, _FIELD[k])) for nr in live for k in KINDS}
        self._by_tuple = {k: v for k, v in self._by_tuple.items() if k in live_tuples}
        self._by_key = {k: g for k, g in self._by_key.items() if id(g) in live_groups}
        live_entries = sum(len(g.entries) for g in live_groups.values())
        if len(self._by_nv) > 2 * live_entries + 1024:
            self._by_nv = {(e.name, e.version): e for g in live_groups.values() for e in g.entries.values()}
        live_objects = sum(len(t) for t, _ in self._by_tuple.values())
        if len(self._by_obj) > 2 * live_objects + 1024:
            old = self._by_obj
            self._by_obj = {id(o): old[id(o)] for t, _ in self._by_tuple.values() for o in t if id(o) in old}

    def stats(self) -> dict[str, int]:
        return {"tuples": len(self._by_tuple), "groups": len(self._by_key), "objects": len(self._by_obj),
                "entries": len(self._by_nv)}
