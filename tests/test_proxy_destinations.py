"""Decision logic of the node proxy: no sockets, no event loop."""

from __future__ import annotations

import json
import socket
import struct

import pytest

from nodeagent.proxy.destinations import (NO_HEALTHY_UPSTREAM, NOT_LOCAL_WORKLOAD, UNKNOWN_DESTINATION,
                                          Destinations, Forward, Passthrough, Refuse, RoundRobin,
                                          connection_labels, service_endpoints)
from nodeagent.capture.origdst import parse_sockaddr
from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot, Service, ServicePort, Workload
from nodeagent.telemetry import TCP_LABEL_NAMES, TcpLabels, workload_labels

NODE = "node-1"

CLIENT = Workload("client", "apps", NODE, "198.18.1.5")
WEB_A = Workload("web-a", "shop", NODE, "198.18.1.10")
WEB_B = Workload("web-b", "shop", "node-2", "198.18.2.10")

WEB = Service(
    "web", "shop", "198.19.0.10", (ServicePort(80, 8080, name="http"),),
    (Endpoint("198.18.1.10", 8080, NODE, "web-a", "shop"), Endpoint("198.18.2.10", 8080, "node-2", "web-b", "shop")),
)
EMPTY = Service("empty", "shop", "198.19.0.11", (ServicePort(80, 8080),), ())
MULTI = Service(
    "multi", "shop", "198.19.0.12", (ServicePort(80, 8080, name="http"), ServicePort(9090, 9091, name="metrics")),
    (Endpoint("198.18.1.10", 8080), Endpoint("198.18.2.10", 8080), Endpoint("198.18.1.10", 9091)),
)


def snapshot(*services: Service, workloads=(CLIENT, WEB_A, WEB_B)) -> NodeSnapshot:
    return NodeSnapshot(node=NODE, services=services or (WEB, EMPTY, MULTI), workloads=tuple(workloads))


# ------------------------------------------------------------------ outbound

def test_vip_round_robins_across_endpoints_at_target_port():
    d = Destinations(NODE)
    snap = snapshot()
    picks = [d.outbound(snap, "198.19.0.10", 80) for _ in range(4)]
    assert all(isinstance(p, Forward) for p in picks)
    assert [p.address for p in picks] == [("198.18.1.10", 8080), ("198.18.2.10", 8080)] * 2
    assert picks[0].service is WEB
    assert picks[0].workload == WEB_A and picks[1].workload == WEB_B


def test_round_robin_state_is_per_service_port():
    d = Destinations(NODE)
    snap = snapshot()
    assert d.outbound(snap, "198.19.0.10", 80).address == ("198.18.1.10", 8080)
    # another service does not advance web's rotation
    assert d.outbound(snap, "198.19.0.12", 80).address == ("198.18.1.10", 8080)
    assert d.outbound(snap, "198.19.0.10", 80).address == ("198.18.2.10", 8080)


def test_multi_port_service_uses_endpoints_of_that_target_port():
    d = Destinations(NODE)
    snap = snapshot()
    metrics = [d.outbound(snap, "198.19.0.12", 9090).address for _ in range(3)]
    assert metrics == [("198.18.1.10", 9091)] * 3
    http = {d.outbound(snap, "198.19.0.12", 80).address for _ in range(4)}
    assert http == {("198.18.1.10", 8080), ("198.18.2.10", 8080)}


def test_single_port_service_is_served_by_all_its_endpoints():
    svc = Service("one", "ns", "198.19.0.20", (ServicePort(80, 80),), (Endpoint("198.18.1.10", 8080),))
    assert service_endpoints(svc, svc.ports[0]) == svc.endpoints


def test_pod_ip_goes_to_that_pod_at_the_same_port():
    d = Destinations(NODE)
    decision = d.outbound(snapshot(), "198.18.2.10", 8080)
    assert isinstance(decision, Forward)
    assert decision.address == ("198.18.2.10", 8080)
    assert decision.workload == WEB_B
    assert decision.service is WEB  # the pod serves web at that port: labelled as web


def test_pod_ip_on_a_port_no_service_uses_has_no_service():
    decision = Destinations(NODE).outbound(snapshot(), "198.18.2.10", 22)
    assert isinstance(decision, Forward) and decision.service is None and decision.address == ("198.18.2.10", 22)


def test_unknown_destination_passes_through_by_default():
    assert Destinations(NODE).outbound(snapshot(), "203.0.113.7", 443) == Passthrough("203.0.113.7", 443)


def test_vip_on_unknown_port_is_unknown():
    assert Destinations(NODE).outbound(snapshot(), "198.19.0.10", 81) == Passthrough("198.19.0.10", 81)


def test_unknown_destination_refused_when_configured():
    decision = Destinations(NODE, unknown_destination="refuse").outbound(snapshot(), "203.0.113.7", 443)
    assert decision == Refuse(UNKNOWN_DESTINATION, "NR")
    assert decision.metric_reason == "no_route"


def test_unknown_destination_policy_is_validated():
    with pytest.raises(ValueError, match="unknown_destination"):
        Destinations(NODE, unknown_destination="drop")


def test_service_without_endpoints_is_refused_uh():
    decision = Destinations(NODE).outbound(snapshot(), "198.19.0.11", 80)
    assert isinstance(decision, Refuse)
    assert decision.reason == NO_HEALTHY_UPSTREAM and decision.response_flags == "UH"
    assert decision.service is EMPTY
    assert decision.metric_reason == "no_healthy_upstream"


def test_empty_snapshot_passes_everything_through():
    snap = NodeSnapshot(node=NODE)
    assert Destinations(NODE).outbound(snap, "198.19.0.10", 80) == Passthrough("198.19.0.10", 80)


# ------------------------------------------------------------------- inbound

def test_inbound_to_local_workload_is_forwarded_unchanged():
    decision = Destinations(NODE).inbound(snapshot(), "198.18.1.10", 8080)
    assert isinstance(decision, Forward)
    assert decision.address == ("198.18.1.10", 8080) and decision.workload == WEB_A


def test_inbound_to_workload_on_another_node_is_refused():
    decision = Destinations(NODE).inbound(snapshot(), "198.18.2.10", 8080)
    assert decision == Refuse(NOT_LOCAL_WORKLOAD, "NR")


@pytest.mark.parametrize("ip", ["203.0.113.7", "198.19.0.10"])
def test_inbound_to_unknown_or_vip_is_refused(ip):
    assert isinstance(Destinations(NODE).inbound(snapshot(), ip, 80), Refuse)


def test_inbound_ignores_unknown_destination_policy():
    d = Destinations(NODE, unknown_destination="passthrough")
    assert isinstance(d.inbound(snapshot(), "203.0.113.7", 80), Refuse)


# ------------------------------------------------------------ snapshot swaps

def test_snapshot_swap_does_not_change_a_decision_already_made():
    d = Destinations(NODE)
    old = snapshot()
    decision = d.outbound(old, "198.19.0.10", 80)
    moved = Service("web", "shop", "198.19.0.10", (ServicePort(80, 8080),), (Endpoint("198.18.9.9", 8080),))
    new = snapshot(moved)
    assert decision.address == ("198.18.1.10", 8080)
    assert decision.service is WEB  # still the old objects
    assert d.outbound(new, "198.19.0.10", 80).address == ("198.18.9.9", 8080)
    # a connection that took the old snapshot still decides with it
    assert d.outbound(old, "198.19.0.10", 80).service is WEB


def test_round_robin_forgets_services_that_disappeared():
    d = Destinations(NODE)
    d.outbound(snapshot(), "198.19.0.10", 80)
    d.outbound(NodeSnapshot(node=NODE), "198.19.0.10", 80)
    assert d.lb._next == {}


def test_round_robin_survives_shrinking_endpoint_lists():
    rr = RoundRobin()
    eps = [Endpoint("198.18.1.1", 1), Endpoint("198.18.1.2", 1), Endpoint("198.18.1.3", 1)]
    rr.pick(("k",), eps)
    rr.pick(("k",), eps)
    assert rr.pick(("k",), eps[:1]) == eps[0]


# -------------------------------------------------------------------- labels

def test_labels_of_a_service_connection():
    snap = snapshot()
    decision = Destinations(NODE).outbound(snap, "198.19.0.10", 80)
    labels = connection_labels(snap, decision, "198.18.1.5", "source")
    assert labels == TcpLabels(
        reporter="source", source_workload="client", source_workload_namespace="apps", source_principal="unknown",
        source_app="unknown", source_version="unknown", source_canonical_service="client",
        source_canonical_revision="latest", source_cluster="Kubernetes",
        destination_service="web.shop.svc.cluster.local", destination_service_name="web",
        destination_service_namespace="shop", destination_workload="web-a",
        destination_workload_namespace="shop", destination_principal="unknown", destination_app="unknown",
        destination_version="unknown", destination_canonical_service="web-a", destination_canonical_revision="latest",
        destination_cluster="Kubernetes", request_protocol="tcp", connection_security_policy="none")


def test_app_version_and_canonical_labels_follow_istio_conventions():
    client = Workload("client-7f9c", "apps", NODE, "198.18.1.5", labels=(("app", "client"), ("version", "v2")))
    web = Workload("web-a", "shop", NODE, "198.18.1.10", labels=(
        ("app.kubernetes.io/name", "web"), ("app.kubernetes.io/version", "1.4"),
        ("service.istio.io/canonical-name", "storefront"), ("service.istio.io/canonical-revision", "r7")))
    snap = snapshot(workloads=(client, web, WEB_B))
    labels = connection_labels(snap, Destinations(NODE).outbound(snap, "198.19.0.10", 80), "198.18.1.5", "source")
    assert (labels.source_app, labels.source_version) == ("client", "v2")
    # canonical name: the app label before the workload name; revision: the version label
    assert (labels.source_canonical_service, labels.source_canonical_revision) == ("client", "v2")
    assert (labels.destination_app, labels.destination_version) == ("web", "1.4")
    assert (labels.destination_canonical_service, labels.destination_canonical_revision) == ("storefront", "r7")


def test_workload_labels_precedence():
    def derived(**labels):
        return workload_labels(Workload("wl", "ns", NODE, "198.18.1.9", labels=tuple(labels.items())))
    assert derived() == ("unknown", "unknown", "wl", "latest")
    assert derived(**{"app.kubernetes.io/name": "k", "app": "a", "app.kubernetes.io/version": "kv",
                      "version": "v"}) == ("a", "v", "k", "kv")
    assert derived(app="a") == ("a", "unknown", "a", "latest")
    assert workload_labels(None) == ("unknown",) * 4
    assert workload_labels(None, "named-only") == ("unknown", "unknown", "named-only", "latest")


def test_labels_of_passthrough_and_unknown_source():
    snap = snapshot()
    labels = connection_labels(snap, Passthrough("203.0.113.7", 443), "203.0.113.99", "source")
    # an address the mesh does not know is never a label value (bounded cardinality)
    assert "203.0.113.7" not in labels and "203.0.113.99" not in labels
    assert set(labels) - {"source", "tcp", "none"} == {"unknown"}


def test_labels_of_uh_refusal_name_the_service():
    snap = snapshot()
    decision = Destinations(NODE).outbound(snap, "198.19.0.11", 80)
    labels = connection_labels(snap, decision, "198.18.1.5", "source")
    assert labels.destination_service == "empty.shop.svc.cluster.local"
    assert (labels.destination_service_name, labels.destination_service_namespace) == ("empty", "shop")
    assert labels.destination_workload_namespace == "shop" and labels.destination_workload == "unknown"
    assert labels.destination_canonical_service == labels.destination_cluster == "unknown"


# Istio's standard TCP labels (istio.io/latest/docs/reference/config/metrics); the request
# metrics add response_code and grpc_response_status (tests/test_metrics_istio.py)
ISTIO_TCP_LABELS = {
    "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_canonical_service", "source_canonical_revision", "source_cluster", "destination_workload",
    "destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
    "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_canonical_service", "destination_canonical_revision", "destination_cluster", "request_protocol",
    "response_flags", "connection_security_policy"}


def test_label_names_are_istios():
    assert set(TCP_LABEL_NAMES) == ISTIO_TCP_LABELS and len(TCP_LABEL_NAMES) == len(ISTIO_TCP_LABELS)


# ------------------------------------------------------------------- origdst

def test_parse_sockaddr_in():
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080) + socket.inet_aton("198.19.0.10") + b"\0" * 8
    assert parse_sockaddr(raw) == ("198.19.0.10", 8080)


def test_parse_sockaddr_in6():
    raw = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 443) + b"\0" * 4
           + socket.inet_pton(socket.AF_INET6, "fd00::1") + b"\0" * 4)
    assert parse_sockaddr(raw) == ("fd00::1", 443)


def test_parse_sockaddr_rejects_garbage():
    with pytest.raises(ValueError):
        parse_sockaddr(b"\x01\x00")
    with pytest.raises(ValueError):
        parse_sockaddr(struct.pack("=H", 99) + b"\0" * 14)


# ------------------------------------------------------------------ health checks on L4 picks
def health(*unhealthy: tuple[str, int, str]):
    from nodeagent.state import ENDPOINT_HEALTH, HEALTH_NAMESPACE, ConfigObject
    return ConfigObject(ENDPOINT_HEALTH, HEALTH_NAMESPACE, NODE, json.dumps({"unhealthy": [list(u) for u in unhealthy]}))


FOUR = Service("db", "shop", "198.19.0.20", (ServicePort(5432, 5432, app_protocol="tcp"),),
               tuple(Endpoint(f"198.18.1.{i}", 5432) for i in range(1, 5)))


def test_endpoints_failing_their_health_checks_get_no_connections():
    d = Destinations(NODE)
    snap = NodeSnapshot(node=NODE, services=(FOUR,), config=(health(("198.18.1.2", 5432, "shop/db")),))
    picks = {d.outbound(snap, "198.19.0.20", 5432).address for _ in range(12)}
    assert picks == {("198.18.1.1", 5432), ("198.18.1.3", 5432), ("198.18.1.4", 5432)}


def test_below_the_panic_threshold_every_endpoint_is_used_and_it_is_logged(caplog):
    d = Destinations(NODE)
    failing = health(*((f"198.18.1.{i}", 5432, "shop/db") for i in (1, 2, 3)))  # 25 % healthy < 50 %
    snap = NodeSnapshot(node=NODE, services=(FOUR,), config=(failing,))
    caplog.set_level("INFO", logger="nodeagent.proxy.destinations")
    picks = {d.outbound(snap, "198.19.0.20", 5432).address for _ in range(8)}
    assert len(picks) == 4 and "panic" in caplog.text
    policy = ConfigObject("TrafficPolicy", "shop", "p", json.dumps(
        {"targetRef": {"kind": "Service", "name": "db"}, "healthCheck": {"tcp": {}, "panicThreshold": 20}}))
    snap = NodeSnapshot(node=NODE, services=(FOUR,), config=(failing, policy))
    assert {d.outbound(snap, "198.19.0.20", 5432).address for _ in range(8)} == {("198.18.1.4", 5432)}
    assert "left health-check panic mode" in caplog.text


def test_health_of_another_service_on_the_same_address_does_not_apply():
    d = Destinations(NODE)
    snap = NodeSnapshot(node=NODE, services=(FOUR,), config=(health(("198.18.1.2", 5432, "shop/other")),))
    assert len({d.outbound(snap, "198.19.0.20", 5432).address for _ in range(8)}) == 4
