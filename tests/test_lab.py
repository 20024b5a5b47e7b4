"""The netns lab: topology, isolation, exec, and traffic between pods on different nodes."""

import json
import subprocess
import sys

import pytest

from meshlab.errors import LabError
from meshlab.lab import Lab
from tests.conftest import HOSTMESH

pytestmark = pytest.mark.lab


def curl_json(lab, src, url, *extra):
    r = lab.run(src, ["curl", "-sS", "--max-time", "10", *extra, url])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_status_lists_nodes_and_pods(lab):
    st = lab.status()
    assert st["up"]
    assert [n["name"] for n in st["nodes"]] == ["node1", "node2"]
    assert {(p["node"], p["name"], p["address"]) for p in st["pods"]} == {
        ("node1", "pod-1", "198.18.1.1"), ("node1", "pod-2", "198.18.1.2"),
        ("node2", "pod-1", "198.18.2.1"), ("node2", "pod-2", "198.18.2.2"),
    }
    # the test app runs in every pod's cgroup
    assert all(p["processes"] >= 1 for p in st["pods"])


def test_cli_status_json(lab):
    r = subprocess.run([HOSTMESH, "lab", "status", "--name", lab.name, "-o", "json"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["name"] == lab.name and len(st["pods"]) == 4


def test_http1_across_nodes(lab):
    body = curl_json(lab, "node1/pod-1", "http://198.18.2.2:8080/hello?x=1")
    assert (body["node"], body["pod"]) == ("node2", "pod-2")
    assert body["protocol"] == "HTTP/1.1"
    assert body["source"]["address"] == "198.18.1.1"  # plain routing: no NAT anywhere


def test_h2c_across_nodes(lab):
    body = curl_json(lab, "node1/pod-1", "http://198.18.2.1:8080/", "--http2-prior-knowledge")
    assert (body["node"], body["pod"], body["protocol"]) == ("node2", "pod-1", "HTTP/2")


def test_grpc_across_nodes(lab):
    r = lab.run("node1/pod-2", [sys.executable, "-m", "meshlab.probe", "grpc", "198.18.2.1:9090", "--message", "hi"])
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert (reply["node"], reply["pod"], reply["message"]) == ("node2", "pod-1", "hi")
    assert reply["health"] == "SERVING"


def test_cli_exec_answers_with_the_pod_name(lab):
    r = subprocess.run([HOSTMESH, "lab", "exec", "--name", lab.name, "node1/pod-1", "--",
                        "curl", "-s", "--max-time", "10", "http://198.18.2.1:8080/"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pod"] == "pod-1"


def test_exec_places_process_in_the_pod_cgroup(lab):
    r = lab.run("node2/pod-1", ["cat", "/proc/self/cgroup"])
    assert f"0::/hm-{lab.name}/node2/pod-1" in r.stdout.splitlines()
    r = lab.run("node2", ["cat", "/proc/self/cgroup"])
    assert f"0::/hm-{lab.name}/node2/system" in r.stdout.splitlines()


def test_exec_exit_code_is_the_commands(lab):
    r = subprocess.run([HOSTMESH, "lab", "exec", "--name", lab.name, "node1/pod-1", "--", "sh", "-c", "exit 7"],
                       timeout=30)
    assert r.returncode == 7


def test_no_route_out_of_the_lab(lab):
    for spec in ("node1", "node2", "node1/pod-1", "node2/pod-2", "controlplane"):
        routes = lab.run(spec, ["ip", "-4", "route", "show", "table", "all"]).stdout
        assert "default" not in routes, (spec, routes)
        # an address outside the lab is unreachable from everywhere in it
        r = lab.run(spec, ["ip", "route", "get", "192.0.2.1"])
        assert r.returncode != 0, (spec, r.stdout)


def test_no_link_in_the_root_namespace(lab):
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "vp-pod" not in links and "br0" not in links


def test_unknown_pod_names_the_known_ones(lab):
    with pytest.raises(LabError) as exc:
        lab.target("node1/pod-7")
    assert "node1/pod-1, node1/pod-2, node2/pod-1, node2/pod-2" in str(exc.value)
    r = subprocess.run([HOSTMESH, "lab", "exec", "--name", lab.name, "node9/pod-1", "--", "true"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "known pods: node1/pod-1" in r.stderr


def test_up_twice_is_refused_and_leaves_the_lab_intact(lab):
    before = lab.status()
    r = subprocess.run([HOSTMESH, "lab", "up", "--name", lab.name], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "already exists" in r.stderr
    assert lab.status() == before


@pytest.mark.parametrize("args,message", [
    (["--nodes", "0"], "invalid --nodes 0"),
    (["--pods-per-node", "999"], "invalid --pods-per-node 999"),
    (["--name", "BAD"], "invalid lab name 'BAD'"),
])
def test_up_bad_input_builds_nothing(args, message):
    argv = [HOSTMESH, "lab", "up", *args] if "--name" in args else [HOSTMESH, "lab", "up", "--name", "tbad", *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert message in r.stderr
    assert not Lab("tbad").exists()
