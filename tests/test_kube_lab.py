"""The lab in Kubernetes mode (meshlab/kubelab.py): the control plane runs with `--source
kubernetes` against the fake API server, the agents connect as usual, traffic to the
testapp Service works, and a Service change made in the API reaches the agents within 1 s."""

from __future__ import annotations

import json
import time

import pytest

from meshlab import mesh
from meshlab.fakekube import from_mesh_document
from meshlab.kubelab import kube_apply, start_kube_controlplane
from meshlab.lab import Lab
from tests.conftest import require_root, unique_lab_name, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]
NEW_VIP = "198.19.0.88"


@pytest.fixture(scope="module")
def kube_lab():
    require_root("the Kubernetes-mode lab")
    lab = Lab(unique_lab_name())
    try:
        lab.up(2, 2)
        mesh.write_default_config(lab)
        start_kube_controlplane(lab)
        procs = {node: mesh.spawn_agent(lab, node, "iptables") for node in lab.topology()}
        for node, proc in procs.items():
            mesh.wait_ready(lab, node, proc)
        yield lab
    finally:
        lab.down()


def curl(lab, url):
    return lab.run("node1/pod-1", ["curl", "-sS", "--max-time", "3", url], timeout=15)


def services_of(lab, node) -> set[str]:
    snap = json.loads(mesh.admin_get(lab, node, "/config_dump").stdout)["snapshot"]
    return {s["name"] for s in snap["services"]}


def test_traffic_works_with_the_control_plane_on_the_kubernetes_api(kube_lab):
    view = json.loads(mesh.cp_get(kube_lab, "/debug/config").stdout)
    assert view["source"]["kind"] == "kubernetes" and view["source"]["synced"] and view["valid"]
    pods = {json.loads(curl(kube_lab, f"http://{mesh.DEFAULT_SERVICE_VIP}/").stdout)["pod"] for _ in range(8)}
    assert len(pods) >= 2


def test_a_service_made_in_the_api_reaches_the_agents_within_a_second(kube_lab):
    doc = mesh.service_document("kube-new", NEW_VIP, {"app": "testapp"},
                                [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}])
    kube_apply(kube_lab, from_mesh_document(doc))
    applied = time.monotonic()
    for node in kube_lab.topology():
        wait_for(lambda: "kube-new" in services_of(kube_lab, node), timeout=5, what=f"{node} to get the Service")
    assert time.monotonic() - applied < 1.0
    wait_for(lambda: curl(kube_lab, f"http://{NEW_VIP}/").returncode == 0, timeout=10, what="the new VIP to serve")
