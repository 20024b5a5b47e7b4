"""PeerAuthentication decisions (Istio precedence) and the tunnel plan: no sockets."""

from __future__ import annotations

import json

from nodeagent.identity import spiffe_id
from nodeagent.proxy.destinations import Destinations, Forward, Refuse
from nodeagent.proxy.peerauth import PERMISSIVE, STRICT, PeerAuthn
from nodeagent.proxy.tunnel_plan import TunnelPlanner, tunnel_labels
from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot, Service, ServicePort, Workload
from nodeagent.telemetry import TcpLabels

TD = "cluster.local"
WEB = Workload("web", "shop", "node-2", "198.18.2.1", "web", (("app", "web"), ("tier", "front")))
DB = Workload("db", "shop", "node-2", "198.18.2.2", "db", (("app", "db"),))
OTHER = Workload("api", "other", "node-2", "198.18.2.3", "api", (("app", "web"),))
CLIENT = Workload("client", "apps", "node-1", "198.18.1.1", "client")


def pa(ns: str, name: str, **spec) -> ConfigObject:
    return ConfigObject("PeerAuthentication", ns, name, json.dumps(spec))


def mesh_config(ns: str) -> ConfigObject:
    return ConfigObject("MeshConfig", ns, "default", "{}")


def modes(*config, port: int = 8080) -> dict[str, str]:
    snap = NodeSnapshot(node="node-2", workloads=(WEB, DB, OTHER), config=tuple(config))
    p = PeerAuthn()
    return {w.name: p.mode(snap, w, port) for w in (WEB, DB, OTHER)}


def test_default_is_permissive():
    assert modes() == {"web": PERMISSIVE, "db": PERMISSIVE, "api": PERMISSIVE}


def test_namespace_wide_applies_to_that_namespace_only():
    assert modes(pa("shop", "default", mtls={"mode": "STRICT"})) == {"web": STRICT, "db": STRICT, "api": PERMISSIVE}


def test_mesh_wide_is_the_namespace_wide_policy_of_the_meshconfig_namespace():
    got = modes(mesh_config("hostmesh-system"), pa("hostmesh-system", "default", mtls={"mode": "STRICT"}))
    assert got == {"web": STRICT, "db": STRICT, "api": STRICT}
    # a namespace-wide policy overrides the mesh-wide one
    got = modes(mesh_config("hostmesh-system"), pa("hostmesh-system", "default", mtls={"mode": "STRICT"}),
                pa("other", "default", mtls={"mode": "PERMISSIVE"}))
    assert got == {"web": STRICT, "db": STRICT, "api": PERMISSIVE}


def test_workload_selector_beats_namespace_wide_and_only_in_its_namespace():
    got = modes(pa("shop", "default", mtls={"mode": "STRICT"}),
                pa("shop", "web-open", selector={"matchLabels": {"app": "web"}}, mtls={"mode": "PERMISSIVE"}))
    assert got == {"web": PERMISSIVE, "db": STRICT, "api": PERMISSIVE}  # api has app=web but lives in "other"


def test_port_level_beats_the_workload_mode_and_unset_inherits():
    config = (pa("shop", "default", mtls={"mode": "STRICT"}),
              pa("shop", "web-ports", selector={"matchLabels": {"app": "web"}},
                 portLevelMtls={"9090": {"mode": "PERMISSIVE"}}))
    assert modes(*config, port=9090)["web"] == PERMISSIVE
    assert modes(*config, port=8080)["web"] == STRICT  # no workload mtls: inherits the namespace's
    config = (pa("shop", "web", selector={"matchLabels": {"app": "web"}}, mtls={"mode": "PERMISSIVE"},
                 portLevelMtls={"8080": {"mode": "STRICT"}}),)
    assert modes(*config, port=8080)["web"] == STRICT
    assert modes(*config, port=8081)["web"] == PERMISSIVE


def test_several_matching_selectors_first_by_name_wins():
    config = (pa("shop", "b-strict", selector={"matchLabels": {"app": "web"}}, mtls={"mode": "STRICT"}),
              pa("shop", "a-open", selector={"matchLabels": {"tier": "front"}}, mtls={"mode": "PERMISSIVE"}))
    assert modes(*config)["web"] == PERMISSIVE


def test_selector_needs_every_label():
    config = (pa("shop", "s", selector={"matchLabels": {"app": "web", "tier": "back"}}, mtls={"mode": "STRICT"}),)
    assert modes(*config)["web"] == PERMISSIVE


def test_malformed_spec_fails_closed():
    bad = ConfigObject("PeerAuthentication", "shop", "broken", "[]")
    assert modes(bad)["web"] == STRICT
    assert modes(pa("shop", "odd", mtls={"mode": "DISABLE"}))["web"] == STRICT


def test_answers_follow_a_new_snapshot():
    p = PeerAuthn()
    one = NodeSnapshot(node="node-2", workloads=(WEB,))
    two = NodeSnapshot(node="node-2", workloads=(WEB,), config=(pa("shop", "default", mtls={"mode": "STRICT"}),))
    assert p.mode(one, WEB, 80) == PERMISSIVE
    assert p.mode(two, WEB, 80) == STRICT
    assert p.mode(one, WEB, 80) == PERMISSIVE


# ------------------------------------------------------------------ tunnel plan

SVC = Service("web", "shop", "198.19.0.10", (ServicePort(80, 8080),),
              (Endpoint("198.18.2.1", 8080, "node-2", "web", "shop"),
               Endpoint("198.18.1.9", 8080, "node-1", "web-local", "shop")))
LOCAL_WEB = Workload("web-local", "shop", "node-1", "198.18.1.9", "web")


def plan_snapshot(*extra) -> NodeSnapshot:
    return NodeSnapshot(node="node-1", services=(SVC,), workloads=(CLIENT, WEB, DB, LOCAL_WEB, *extra))


def test_cross_node_from_a_mesh_workload_is_tunnelled():
    snap = plan_snapshot()
    decision = Destinations("node-1").outbound(snap, "198.19.0.10", 80)
    assert decision.address == ("198.18.2.1", 8080)
    plan = TunnelPlanner("node-1", TD).outbound(snap, decision, "198.18.1.1")
    assert plan.source == spiffe_id(TD, "apps", "client")
    assert plan.destination == spiffe_id(TD, "shop", "web")
    assert plan.dial == ("198.18.2.1", 15008) and plan.target == ("198.18.2.1", 8080)
    assert plan.sni == "web.shop.serviceaccount.identity.cluster.local"
    labels = tunnel_labels(TcpLabels("source"), plan)
    assert labels.connection_security_policy == "mutual_tls"
    assert labels.source_principal == "spiffe://cluster.local/ns/apps/sa/client"


def test_plaintext_cases_same_node_non_mesh_source_unknown_destination():
    snap = plan_snapshot()
    planner = TunnelPlanner("node-1", TD)
    d = Destinations("node-1")
    d.outbound(snap, "198.19.0.10", 80)
    local = d.outbound(snap, "198.19.0.10", 80)
    assert local.address == ("198.18.1.9", 8080)
    assert planner.outbound(snap, local, "198.18.1.1") is None  # same node
    remote = d.outbound(snap, "198.18.2.1", 8080)
    assert planner.outbound(snap, remote, "198.18.1.200") is None  # not a mesh workload
    assert planner.outbound(snap, remote, "198.18.2.2") is None  # a workload of another node can't be a source here
    passthrough = d.outbound(snap, "203.0.113.5", 443)
    assert planner.outbound(snap, passthrough, "198.18.1.1") is None


def test_a_workload_without_a_valid_identity_is_refused_not_plaintext():
    bad = Workload("bad", "Shop_X", "node-2", "198.18.2.9", "web")
    snap = plan_snapshot(bad)
    decision = Destinations("node-1").outbound(snap, "198.18.2.9", 80)
    assert isinstance(TunnelPlanner("node-1", TD).outbound(snap, decision, "198.18.1.1"), Refuse)


def test_inbound_stream_target_must_be_local_and_run_as_the_presented_identity():
    snap = NodeSnapshot(node="node-2", workloads=(CLIENT, WEB, DB))
    planner = TunnelPlanner("node-2", TD)
    d = Destinations("node-2")
    web_id = spiffe_id(TD, "shop", "web")
    assert isinstance(planner.inbound_stream(snap, d, web_id, "198.18.2.1", 8080), Forward)
    assert planner.inbound_stream(snap, d, web_id, "198.18.2.2", 8080).reason == "tunnel target runs as another identity"
    assert planner.inbound_stream(snap, d, web_id, "198.18.1.1", 8080).response_flags == "NR"  # not local
    assert isinstance(planner.inbound_stream(snap, d, web_id, "198.18.2.1", 15008), Refuse)  # tunnel loop
    assert planner.server_identity(snap, "198.18.2.2") == (DB, spiffe_id(TD, "shop", "db"))
    assert isinstance(planner.server_identity(snap, "198.18.1.1"), Refuse)


def test_sni_table_leaves_out_remote_workloads():
    snap = NodeSnapshot(node="node-2", workloads=(CLIENT, WEB, DB))
    table = TunnelPlanner("node-2", TD).local_identities(snap)
    assert table == {"web.shop.serviceaccount.identity.cluster.local": spiffe_id(TD, "shop", "web"),
                     "db.shop.serviceaccount.identity.cluster.local": spiffe_id(TD, "shop", "db")}


def test_source_labels_trust_the_address_only_when_its_identity_matches():
    snap = NodeSnapshot(node="node-2", workloads=(CLIENT, WEB))
    planner = TunnelPlanner("node-2", TD)
    client_id, web_id = spiffe_id(TD, "apps", "client"), spiffe_id(TD, "shop", "web")
    base = TcpLabels("destination")
    good = planner.source_labels(snap, base, client_id, "198.18.1.1", web_id)
    assert (good.source_workload, good.source_workload_namespace) == ("client", "apps")
    assert (good.source_canonical_service, good.source_cluster) == ("client", "Kubernetes")
    spoofed = planner.source_labels(snap, base, spiffe_id(TD, "evil", "x"), "198.18.1.1", web_id)
    assert (spoofed.source_workload, spoofed.source_workload_namespace) == ("unknown", "evil")
    assert spoofed.source_app == spoofed.source_canonical_service == spoofed.source_cluster == "unknown"
    assert spoofed.source_principal == "spiffe://cluster.local/ns/evil/sa/x"
