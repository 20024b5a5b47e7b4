"""Snapshot builder: endpoints from selectors, target ports, nodes, versions, consistency checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from controlplane.builder import build_snapshot, build_snapshots, check_consistency
from controlplane.errors import SnapshotError
from controlplane.model import MeshModel, load_texts
from controlplane.sources import load_directory
from nodeagent.proxy.destinations import service_endpoints
from nodeagent.state import Endpoint, NodeSnapshot, ServicePort, content_version

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "config"


def workload(name: str, node: str, address: str, labels: str, ports: str = "[]", ns: str = "default") -> str:
    return (f"apiVersion: hostmesh.io/v1alpha1\nkind: Workload\n"
            f"metadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\n"
            f"spec: {{node: {node}, address: {address}, ports: {ports}}}\n")


def service(name: str, selector: str, ports: str, ns: str = "default", cluster_ip: str = "") -> str:
    ip = f"  clusterIP: {cluster_ip}\n" if cluster_ip else ""
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n{ip}  selector: {selector}\n  ports: {ports}\n")


def model_of(*docs: str) -> MeshModel:
    result = load_texts({"all.yaml": "---\n".join(docs)})
    assert [str(e) for e in result.errors] == []
    return result.model


def eps(snapshot: NodeSnapshot, name: str, ns: str = "default") -> list[tuple[str, int, str]]:
    svc = next(s for s in snapshot.services if (s.namespace, s.name) == (ns, name))
    return [(e.address, e.port, e.workload) for e in svc.endpoints]


WEB_PODS = (
    workload("a", "n1", "10.0.1.1", "{app: web, track: stable}", "[{name: http, port: 8080}, {name: grpc, port: 9090}]"),
    workload("b", "n2", "10.0.2.1", "{app: web, track: canary}", "[{name: http, port: 8080}, {name: grpc, port: 9090}]"),
    workload("c", "n2", "10.0.2.2", "{app: db}", "[{name: sql, port: 5432}]"),
    workload("d", "n3", "10.0.3.1", "{app: web, track: stable}", "[{name: http, port: 8080}]", ns="other"),
)


def test_selector_matches_all_labels_within_the_namespace():
    m = model_of(*WEB_PODS,
                 service("web", "{app: web}", "[{port: 80, targetPort: 8080}]", cluster_ip="198.19.0.1"),
                 service("stable", "{app: web, track: stable}", "[{port: 80, targetPort: 8080}]"),
                 service("none", "{}", "[{port: 80}]"),
                 service("nomatch", "{app: web, track: blue}", "[{port: 80}]"))
    snap = build_snapshot(m, "n1")
    assert eps(snap, "web") == [("10.0.1.1", 8080, "a"), ("10.0.2.1", 8080, "b")]
    assert eps(snap, "stable") == [("10.0.1.1", 8080, "a")]     # d has the labels but is in namespace other
    assert eps(snap, "none") == [] and eps(snap, "nomatch") == []
    web = next(s for s in snap.services if s.name == "web")
    assert web.cluster_ip == "198.19.0.1"
    assert web.endpoints[0] == Endpoint(address="10.0.1.1", port=8080, node="n1", workload="a", namespace="default")


def test_named_target_port_resolves_per_workload():
    """Single-port Service: each Workload's own number; the ServicePort carries the first one."""
    m = model_of(workload("a", "n1", "10.0.1.1", "{app: api}", "[{name: http, port: 8080}]"),
                 workload("b", "n1", "10.0.1.2", "{app: api}", "[{name: http, port: 8081}]"),
                 workload("c", "n1", "10.0.1.3", "{app: api}"),                       # no such port: no endpoint
                 service("api", "{app: api}", "[{name: http, port: 80, targetPort: http}]"))
    snap = build_snapshot(m, "n1")
    api = snap.services[0]
    assert api.ports == (ServicePort(port=80, target_port=8080, name="http", protocol="TCP"),)
    assert eps(snap, "api") == [("10.0.1.1", 8080, "a"), ("10.0.1.2", 8081, "b")]
    assert service_endpoints(api, api.ports[0]) == api.endpoints      # what the proxy will dial


def test_multi_port_service_has_one_endpoint_per_workload_and_target_port():
    m = model_of(*WEB_PODS, service("web", "{app: web}", "[{name: http, port: 80, targetPort: http, appProtocol: http},"
                                                         " {name: grpc, port: 9090, targetPort: grpc}]"))
    snap = build_snapshot(m, "n1")
    web = snap.services[0]
    assert [(p.port, p.target_port, p.app_protocol) for p in web.ports] == [(80, 8080, "http"), (9090, 9090, "")]
    assert eps(snap, "web") == [("10.0.1.1", 8080, "a"), ("10.0.1.1", 9090, "a"),
                                ("10.0.2.1", 8080, "b"), ("10.0.2.1", 9090, "b")]
    # the proxy's per-port filtering picks exactly the right ones
    assert [(e.address, e.port) for e in service_endpoints(web, web.ports[1])] == [("10.0.1.1", 9090),
                                                                                   ("10.0.2.1", 9090)]


def test_two_service_ports_to_one_target_share_endpoints():
    m = model_of(WEB_PODS[0], service("web", "{app: web}", "[{name: a, port: 80, targetPort: 8080},"
                                                           " {name: b, port: 8080, targetPort: http}]"))
    assert eps(build_snapshot(m, "n1"), "web") == [("10.0.1.1", 8080, "a")]


def test_nodes_are_the_given_ones_plus_workload_nodes():
    m = model_of(*WEB_PODS)
    snaps = build_snapshots(m, ["n9", "n1", ""])
    assert list(snaps) == ["n1", "n2", "n3", "n9"]
    assert all(s.node == n for n, s in snaps.items())
    # every node sees every service and workload (all are reachable today)
    assert {len(s.workloads) for s in snaps.values()} == {4}
    assert snaps["n9"].local_workloads() == () and [w.name for w in snaps["n2"].local_workloads()] == ["b", "c"]


def test_snapshot_content_from_the_examples():
    model = load_directory(str(EXAMPLES)).model
    snap = build_snapshots(model, [])["node1"]
    check_consistency(snap)
    assert [s.name for s in snap.services] == ["web", "web-canary"]
    assert [w.name for w in snap.workloads] == ["node1-pod1", "node1-pod2", "node2-pod1", "node2-pod2"]
    assert [(c.kind, c.name) for c in snap.config] == [
        ("AuthorizationPolicy", "web-api"), ("FaultInjection", "web-chaos"), ("HTTPRoute", "web-canary-split"),
        ("MeshConfig", "default"),
        ("PeerAuthentication", "default"), ("RequestAuthentication", "web-jwt"), ("Telemetry", "web"),
        ("TrafficPolicy", "web")]
    assert snap.workload_by_ip("198.18.2.2").labels == (("app", "web"), ("track", "canary"), ("version", "v2"))
    svc, port = snap.service_by_vip("198.19.0.20", 80)
    assert svc.name == "web" and port.target_port == 8080
    # the snapshot survives the agent's own serialisation unchanged, version included
    assert NodeSnapshot.from_dict(snap.to_dict()) == snap


def test_versions_are_the_agents_content_version():
    model = load_directory(str(EXAMPLES)).model
    for snap in build_snapshots(model, ["extra"]).values():
        assert snap.version == content_version(snap)
        assert snap.version == NodeSnapshot.from_dict(snap.to_dict()).version


def test_versions_are_stable_across_reloads_and_node_specific():
    a = build_snapshots(load_directory(str(EXAMPLES)).model, ["node3"])
    b = build_snapshots(load_directory(str(EXAMPLES)).model, ["node3"])
    assert {n: s.version for n, s in a.items()} == {n: s.version for n, s in b.items()}
    assert a == b
    assert len({s.version for s in a.values()}) == 3      # same content, different node


def test_versions_change_when_endpoints_change(tmp_path: Path):
    files = {p.name: p.read_text() for p in EXAMPLES.glob("*.yaml")}
    before = build_snapshots(load_texts(files).model)
    files["scale.yaml"] = workload("node1-pod3", "node1", "198.18.1.3", "{app: web, track: canary}",
                                   "[{name: http, port: 8080}]")
    after = build_snapshots(load_texts(files).model)
    assert all(after[n].version != before[n].version for n in before)
    assert eps(after["node2"], "web-canary") == [("198.18.1.3", 8080, "node1-pod3"), ("198.18.2.2", 8080, "node2-pod2")]
    # a change that does not touch snapshot content (an annotation) keeps the versions
    files["mesh.yaml"] = files["mesh.yaml"].replace("  name: default\n", "  name: default\n  annotations: {a: b}\n")
    touched = build_snapshots(load_texts(files).model)
    assert {n: s.version for n, s in touched.items()} == {n: s.version for n, s in after.items()}


def test_allocated_cluster_ips_are_stable_across_reloads():
    docs = [service(f"s{i}", "{app: x}", "[{port: 80}]") for i in range(30)]
    first = build_snapshot(model_of(*docs), "n1")
    second = build_snapshot(model_of(*reversed(docs)), "n1")
    assert [(s.name, s.cluster_ip) for s in first.services] == [(s.name, s.cluster_ip) for s in second.services]
    assert first.version == second.version


def test_check_consistency_rejects_broken_snapshots():
    snap = build_snapshot(load_directory(str(EXAMPLES)).model, "node1")
    check_consistency(snap)

    web = snap.services[0]
    stray = Endpoint(address="10.9.9.9", port=8080, node="node9", workload="ghost", namespace="default")
    broken = dataclasses.replace(web, endpoints=web.endpoints + (stray,))
    bad = NodeSnapshot(node="node1", services=(broken,) + snap.services[1:], workloads=snap.workloads,
                       config=snap.config)
    with pytest.raises(SnapshotError) as exc:
        check_consistency(bad)
    assert str(exc.value) == (
        "snapshot for node 'node1' is inconsistent: service default/web: endpoint 10.9.9.9:8080 names workload "
        "default/ghost, which is not in the snapshot")

    wrong_port = Endpoint(address="198.18.1.1", port=7000, node="node1", workload="node1-pod1", namespace="default")
    broken = dataclasses.replace(web, endpoints=web.endpoints + (wrong_port,))
    bad = NodeSnapshot(node="node1", services=(broken, broken), workloads=snap.workloads[::-1], config=())
    with pytest.raises(SnapshotError) as exc:
        check_consistency(bad)
    assert str(exc.value) == (
        "snapshot for node 'node1' is inconsistent: workloads are not sorted by namespace/name; "
        "service default/web: endpoint 198.18.1.1:7000 serves none of the target ports 8080, 9090; "
        "service default/web appears twice; service default/web: 198.19.0.20:80 is also service default/web; "
        "service default/web: 198.19.0.20:9090 is also service default/web; "
        "service default/web: endpoint 198.18.1.1:7000 serves none of the target ports 8080, 9090; "
        "expected exactly one MeshConfig, found 0")

    stale = dataclasses.replace(snap, version="0000000000000000")
    with pytest.raises(SnapshotError, match=r"version 0000000000000000 does not match the content \(expected "):
        check_consistency(stale)


def test_unchanged_objects_are_shared_across_builds():
    files = {p.name: p.read_text() for p in EXAMPLES.glob("*.yaml")}
    before = build_snapshots(load_texts(files).model)["node1"]
    files["scale.yaml"] = workload("node1-pod3", "node1", "198.18.1.3", "{app: other}")
    after = build_snapshots(load_texts(files).model)["node1"]
    assert after.services is before.services and after.config is before.config   # nothing changed there
    assert after.workloads is not before.workloads
    assert all(any(w is old for old in before.workloads) for w in after.workloads if w.name != "node1-pod3")
