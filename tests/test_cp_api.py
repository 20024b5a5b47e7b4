"""The discovery API: generated code, resources split/merge, versions, wire assembly, deltas."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from controlplane.api import SERVICE_NAME, STREAM_METHOD, gen
from controlplane.api import discovery_pb2 as pb
from controlplane.resources import (
    BUCKETS,
    Delta,
    InconsistentSnapshot,
    ResourceIndex,
    bucket_digests,
    bucket_of,
    delta,
    differing_buckets,
    encode_update,
    merge,
    resource_digest,
    resource_from_proto,
    resource_name,
    resource_to_dict,
    resource_to_proto,
    split,
    version_of,
)
from tests.generated_code import without_version_stamps
from nodeagent.state import (
    ConfigObject,
    Endpoint,
    NodeSnapshot,
    Service,
    ServicePort,
    Workload,
)

REPO = Path(__file__).resolve().parent.parent


def svc(i: int, endpoints: int = 2, ns: str = "default") -> Service:
    return Service(name=f"svc{i}", namespace=ns, cluster_ip=f"198.19.0.{i + 1}",
                   ports=(ServicePort(port=80, target_port=8080, name="http", app_protocol="http"),
                          ServicePort(port=9090, target_port=9090)),
                   endpoints=tuple(Endpoint(address=f"198.18.{i}.{j + 1}", port=8080, node=f"n{j % 2}",
                                            workload=f"svc{i}-{j}", namespace=ns) for j in range(endpoints)))


def wl(i: int, node: str = "n0") -> Workload:
    return Workload(name=f"w{i}", namespace="apps", node=node, address=f"198.18.9.{i + 1}",
                    service_account=f"sa{i}", labels=(("app", f"w{i}"), ("tier", "web")))


def cfg(name: str, spec: str = '{"retries":3}') -> ConfigObject:
    return ConfigObject(kind="TrafficPolicy", namespace="default", name=name, spec=spec)


def snapshot(node: str = "n0", services=None, workloads=None, config=None) -> NodeSnapshot:
    return NodeSnapshot(node=node,
                        services=tuple(services if services is not None else [svc(0), svc(1)]),
                        workloads=tuple(workloads if workloads is not None else [wl(0), wl(1, "n1")]),
                        config=tuple(config if config is not None else [cfg("p1")]))


# ------------------------------------------------------------------ generated code

def test_generated_code_is_not_stale(tmp_path):
    gen.generate(tmp_path)
    for proto in gen.PROTOS:
        for name in gen.generated_files(proto):
            fresh = (tmp_path / name).read_bytes()
            committed = (REPO / name).read_bytes()
            assert without_version_stamps(fresh) == without_version_stamps(committed), \
                f"{name} is stale: run `python -m controlplane.api.gen`"


def test_generated_modules_import_as_controlplane_api():
    from controlplane.api import discovery_pb2_grpc

    assert discovery_pb2_grpc.controlplane_dot_api_dot_discovery__pb2 is pb
    svc_desc = pb.DESCRIPTOR.services_by_name["Discovery"]
    assert svc_desc.full_name == SERVICE_NAME
    method = svc_desc.methods_by_name["StreamSnapshots"]
    assert STREAM_METHOD == f"/{SERVICE_NAME}/{method.name}"
    assert method.client_streaming and method.server_streaming


# ------------------------------------------------------------------ resources

def test_resource_names():
    assert resource_name(svc(3)) == "service/default/svc3"
    assert resource_name(wl(2)) == "workload/apps/w2"
    assert resource_name(cfg("p")) == "config/TrafficPolicy/default/p"


@pytest.mark.parametrize("obj", [svc(0), svc(1, endpoints=0), wl(0), Workload("w", "ns", "n", "198.18.0.1"),
                                 cfg("p"), ConfigObject("MeshConfig", "default", "mesh")])
def test_resource_proto_round_trip(obj):
    r = resource_to_proto(obj)
    assert r.name == resource_name(obj)
    assert r.version == version_of(obj)
    back = resource_from_proto(pb.Resource.FromString(r.SerializeToString()))
    assert back == obj


def test_resource_to_dict_parses_back_through_from_dict():
    snap = snapshot()
    docs = {"services": [], "workloads": [], "config": []}
    for obj in (*snap.services, *snap.workloads, *snap.config):
        fld, doc = resource_to_dict(resource_to_proto(obj))
        docs[fld].append(doc)
    parsed = NodeSnapshot.from_dict({"node": "n0", **docs})
    assert parsed.services == snap.services and parsed.workloads == snap.workloads
    assert parsed.config == snap.config


def test_resource_without_body_or_with_a_wrong_name_is_refused():
    with pytest.raises(ValueError, match="no body"):
        resource_from_proto(pb.Resource(name="service/default/x", version="1"))
    r = resource_to_proto(svc(0))
    r.name = "service/default/other"
    with pytest.raises(ValueError, match="is named 'service/default/svc0'"):
        resource_from_proto(r)


def test_versions_follow_content():
    assert version_of(svc(0)) == version_of(svc(0))
    assert version_of(svc(0)) != version_of(svc(0, endpoints=3))
    assert version_of(wl(0)) != version_of(dataclasses.replace(wl(0), labels=(("app", "other"),)))
    assert len(version_of(cfg("p"))) == 16


def test_split_merge_round_trip():
    snap = snapshot(services=[svc(2), svc(0), svc(1)], workloads=[wl(1), wl(0)], config=[cfg("b"), cfg("a")])
    res = split(snap)
    assert set(res) == {"service/default/svc0", "service/default/svc1", "service/default/svc2",
                        "workload/apps/w0", "workload/apps/w1",
                        "config/TrafficPolicy/default/a", "config/TrafficPolicy/default/b"}
    assert all(v == version_of(o) for v, o in res.values())
    back = merge("n0", snap.version, (o for _, o in res.values()))
    assert back.version == snap.version
    # each kind comes back ordered by name; the content is the same
    assert back.services == (svc(0), svc(1), svc(2))
    assert set(back.workloads) == set(snap.workloads) and set(back.config) == set(snap.config)
    assert NodeSnapshot.from_dict(back.to_dict()).to_dict()["services"] == back.to_dict()["services"]


def test_split_refuses_duplicate_names():
    with pytest.raises(InconsistentSnapshot, match="duplicate resource service/default/svc0"):
        split(snapshot(services=[svc(0), dataclasses.replace(svc(0), cluster_ip="198.19.9.9")]))


# ------------------------------------------------------------------ index, wire assembly, deltas

def index(snap: NodeSnapshot, idx: ResourceIndex | None = None):
    return (idx or ResourceIndex()).index(snap, time.time())


def parse(nonce: str, nr, d: Delta) -> pb.SnapshotUpdate:
    return pb.SnapshotUpdate.FromString(encode_update(nonce, nr, d))


def test_assembled_update_equals_the_protobuf_built_one():
    snap = snapshot()
    nr = index(snap)
    got = parse("7.1", nr, delta(None, nr))
    want = pb.SnapshotUpdate(nonce="7.1", snapshot_version=snap.version, full_state=True,
                             resource_digest=nr.digest,
                             changed=[resource_to_proto(o) for o in (*snap.services, *snap.workloads, *snap.config)])
    assert got == want
    # and the digest is the one an agent computes from the versions it holds
    assert nr.digest == resource_digest({r.name: r.version for r in got.changed})


def test_index_shares_entries_and_groups_across_nodes():
    idx = ResourceIndex()
    services, workloads = (svc(0), svc(1)), (wl(0),)
    a = index(NodeSnapshot(node="a", services=services, workloads=workloads), idx)
    b = index(NodeSnapshot(node="b", services=services, workloads=workloads), idx)
    assert a.groups[0] is b.groups[0] and a.groups[1] is b.groups[1]
    # equal content built as new objects (a builder that rebuilds everything) is shared too
    c = index(NodeSnapshot(node="c", services=(svc(0), svc(1)), workloads=(wl(0),)), idx)
    assert c.groups[0] is a.groups[0]
    assert c.groups[0].entries["service/default/svc0"].field is a.groups[0].entries["service/default/svc0"].field


def test_index_refuses_duplicate_names():
    with pytest.raises(InconsistentSnapshot, match="duplicate resource workload/apps/w0"):
        index(snapshot(workloads=[wl(0), wl(0, "n1")]))


def test_delta_between_published_snapshots_only_carries_changes():
    idx = ResourceIndex()
    old = index(snapshot(), idx)
    new_snap = snapshot(services=[svc(0), svc(1, endpoints=5), svc(2)], workloads=[wl(0)])
    new = index(new_snap, idx)
    d = delta(old, new)
    u = parse("1.2", new, d)
    assert sorted(r.name for r in u.changed) == ["service/default/svc1", "service/default/svc2"]
    assert list(u.removed) == ["workload/apps/w1"]
    assert not u.full_state and (d.changed, d.removed) == (2, 1)
    assert delta(old, new) == d  # memoized: the same shared bytes for every agent
    assert delta(new, new).parts == (b"", b"", b"")


def test_delta_from_declared_versions():
    new = index(snapshot())
    held = {n: v for n, v in new.versions().items()}
    held["service/default/svc1"] = "stale"
    del held["workload/apps/w0"]
    held["service/default/gone"] = "x"
    u = parse("1.1", new, delta(held, new))
    assert sorted(r.name for r in u.changed) == ["service/default/svc1", "workload/apps/w0"]
    assert list(u.removed) == ["service/default/gone"]
    assert not u.full_state
    # nothing declared -> everything, replacing whatever the agent has
    u = parse("1.1", new, delta({}, new))
    assert u.full_state and len(u.changed) == len(new)


def test_bucket_digests_of_server_and_agent_agree():
    nr = index(snapshot(services=[svc(i) for i in range(40)], workloads=[wl(i) for i in range(30)]))
    versions = nr.versions()
    assert nr.bucket_digests() == bucket_digests(versions)
    assert len(nr.bucket_digests()) == BUCKETS * 8
    changed = dict(versions)
    changed["service/default/svc7"] = "other"
    assert differing_buckets(nr.bucket_digests(), bucket_digests(changed)) == [bucket_of("service/default/svc7")]


def test_delta_restricted_to_buckets():
    idx = ResourceIndex()
    old = index(snapshot(services=[svc(i) for i in range(40)]), idx)
    new = index(snapshot(services=[svc(i) for i in range(40) if i != 3] + [svc(40)]), idx)
    held = old.versions()
    b = differing_buckets(new.bucket_digests(), bucket_digests(held))
    upload = {n: v for n, v in held.items() if bucket_of(n) in set(b)}
    u = parse("1.1", new, delta(upload, new, buckets=b))
    assert [r.name for r in u.changed] == ["service/default/svc40"]
    assert list(u.removed) == ["service/default/svc3"]
    assert len(upload) < len(held)
