"""The agent's snapshot model: parsing reports every problem with its path; versions are content hashes."""

import pytest

from nodeagent.errors import ConfigError
from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot, Service, ServicePort, Workload

SNAP = NodeSnapshot(
    node="node1",
    services=(Service("web", "default", "198.19.0.10", (ServicePort(80, 8080, "http"),),
                      (Endpoint("198.18.1.1", 8080, "node1", "node1-pod-1"),)),),
    workloads=(Workload("node1-pod-1", "default", "node1", "198.18.1.1", "web", (("app", "web"),)),),
    config=(ConfigObject("TrafficPolicy", "default", "web", '{"loadBalancer":"ROUND_ROBIN"}'),),
)


def test_round_trip_keeps_content_and_version():
    again = NodeSnapshot.from_dict(SNAP.to_dict())
    assert again == SNAP
    assert again.version == SNAP.version


def test_version_is_a_content_hash():
    other = NodeSnapshot(node="node1", services=SNAP.services, workloads=())
    assert other.version != SNAP.version
    assert NodeSnapshot(node="node1", services=SNAP.services, workloads=()).version == other.version


def test_lookups():
    svc, port = SNAP.service_by_vip("198.19.0.10", 80)
    assert (svc.name, port.target_port) == ("web", 8080)
    assert SNAP.service_by_vip("198.19.0.10", 81) is None
    assert SNAP.workload_by_ip("198.18.1.1").name == "node1-pod-1"
    assert SNAP.local_workloads() == SNAP.workloads


@pytest.mark.parametrize("data,message", [
    ([], "expected a mapping at the top level, got list"),
    ({"node": ""}, "node: must be a non-empty string"),
    ({"node": "n", "extra": 1}, "unknown field(s) extra"),
    ({"node": "n", "services": {}}, "services: must be a list"),
    ({"node": "n", "services": [{"name": "a", "cluster_ip": "300.1.1.1", "ports": [{"port": 80}]}]},
     "services[0].cluster_ip: '300.1.1.1' is not an IPv4 address"),
    ({"node": "n", "services": [{"name": "a", "cluster_ip": "198.19.0.1", "ports": [{"port": 0}]}]},
     "services[0].ports[0].port: 0 is not a port"),
    ({"node": "n", "services": [{"name": "a", "cluster_ip": "198.19.0.1", "ports": [{"port": 1, "protocol": "UDP"}]}]},
     "only TCP is supported"),
    ({"node": "n", "services": [{"name": "a", "cluster_ip": "198.19.0.1", "ports": [{"port": 1}]},
                                {"name": "b", "cluster_ip": "198.19.0.1", "ports": [{"port": 1}]}]},
     "services[1]: 198.19.0.1:1 is used by another service"),
    ({"node": "n", "workloads": [{"name": "w", "node": "n"}]}, "workloads[0]: missing field(s) address"),
    ({"node": "n", "config": [{"kind": "X", "name": "y", "spec": "not json"}]}, "config[0].spec: must be a JSON object"),
])
def test_bad_snapshots_name_the_field(data, message):
    with pytest.raises(ConfigError) as exc:
        NodeSnapshot.from_dict(data, source="snap.json")
    assert message in str(exc.value)


def test_every_error_is_reported():
    with pytest.raises(ConfigError) as exc:
        NodeSnapshot.from_dict({"node": "n", "services": [{"name": "a"}], "workloads": [{"name": 1}]})
    assert "services[0]" in str(exc.value) and "workloads[0]" in str(exc.value)
