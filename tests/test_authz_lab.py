"""AuthorizationPolicy through the agents, over both capture backends.

node1/pod-2 is re-declared as a workload of namespace `other` running as service account
`intruder`; every other pod is `default/testapp`. Policies are written into the control
plane's config dir, so each change also shows that the next connection follows it.
Cross-node connections are decided at node2's inbound side on the identity the mTLS tunnel
proved; same-node ones (node1/pod-2 -> node1/pod-1) at node1's outbound side.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshlab import mesh, naming
from meshlab.lab import Lab
from tests.conftest import require_root, unique_lab_name, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

TARGET = f"http://{naming.pod_ip(2, 1)}:8080/"       # node2/pod-1
SAME_NODE_TARGET = f"http://{naming.pod_ip(1, 1)}:8080/"  # node1/pod-1
INTRUDER = "node1/pod-2"
FRIEND = "node1/pod-1"
POLICY_FILE = "authz.yaml"


def _workloads_with_an_intruder(lab: Lab) -> list[dict]:
    docs = mesh.workload_documents(lab)
    for d in docs:
        if d["metadata"]["name"] == "node1-pod-2":
            d["metadata"]["namespace"] = "other"
            d["spec"]["serviceAccount"] = "intruder"
    return docs


@pytest.fixture(scope="module", params=["iptables", "ebpf"])
def authz_lab(request):
    require_root("the AuthorizationPolicy lab tests")
    lab = Lab(unique_lab_name())
    lab.capture = request.param
    try:
        lab.up(2, 2, capture=request.param)
        mesh.write_config(lab, "workloads.yaml", _workloads_with_an_intruder(lab))
        wait_for(lambda: reaches(lab, INTRUDER, TARGET), timeout=30, what="the intruder's certificate and traffic")
        yield lab
    finally:
        lab.down()


def reaches(lab: Lab, src: str, url: str) -> bool:
    r = lab.run(src, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", url])
    return r.stdout == "200"


def refused(lab: Lab, src: str, url: str) -> bool:
    """Reset by the proxy (curl 56/52/7), never answered and never a hang to the timeout."""
    r = lab.run(src, ["curl", "-sS", "-o", "/dev/null", "--max-time", "3", url])
    return r.returncode in (7, 52, 56)


def set_policies(lab: Lab, *policies: dict) -> None:
    if not policies:
        (mesh.cp_config_dir(lab) / POLICY_FILE).unlink(missing_ok=True)
        return
    mesh.write_config(lab, POLICY_FILE, [{"apiVersion": "hostmesh.io/v1alpha1", "kind": "AuthorizationPolicy",
                                          "metadata": {"name": name, "namespace": "default"}, "spec": spec}
                                         for name, spec in policies])


def decisions(lab: Lab, node: str) -> str:
    metrics = mesh.admin_get(lab, node, "/stats/prometheus").stdout
    return "\n".join(line for line in metrics.splitlines() if line.startswith("hostmesh_agent_authz_decisions_total"))


@pytest.fixture
def clean(authz_lab):
    yield authz_lab
    set_policies(authz_lab)
    wait_for(lambda: reaches(authz_lab, INTRUDER, TARGET), what="the policies to be gone")


def test_deny_on_a_principal_blocks_that_workload_only(clean):
    lab = clean
    set_policies(lab, ("deny-intruder", {
        "selector": {"matchLabels": {"node": "node2", "pod": "pod-1"}}, "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/other/sa/intruder"]}}]}]}))
    wait_for(lambda: refused(lab, INTRUDER, TARGET), what="the DENY to reach node2")
    for _ in range(5):
        assert refused(lab, INTRUDER, TARGET)
        assert reaches(lab, FRIEND, TARGET)
        assert reaches(lab, "node2/pod-2", TARGET)            # same-node on node2, another principal
    assert reaches(lab, INTRUDER, f"http://{naming.pod_ip(2, 2)}:8080/")  # the policy selects node2/pod-1 only
    counted = decisions(lab, "node2")
    assert 'action="DENY",direction="inbound",policy="default/deny-intruder",result="deny"' in counted, counted


def test_namespace_wide_allow_default_denies_other_namespaces(clean):
    lab = clean
    set_policies(lab, ("allow-default", {"rules": [{"from": [{"source": {"namespaces": ["default"]}}]}]}))
    wait_for(lambda: refused(lab, INTRUDER, TARGET), what="the ALLOW to reach node2")
    assert refused(lab, INTRUDER, TARGET)
    assert refused(lab, INTRUDER, SAME_NODE_TARGET)            # decided by node1's outbound side
    assert reaches(lab, FRIEND, TARGET)
    assert reaches(lab, "node1/pod-1", f"http://{naming.pod_ip(2, 2)}:8080/")
    # HTTP through the L7 driver (the gRPC port of the Service VIP), whichever endpoint the
    # balancer picks: same-node (node1's connector) or cross-node (node2's tunnel reset): 403
    vip_grpc_port = f"http://{mesh.DEFAULT_SERVICE_VIP}:9090/"
    codes = {lab.run(INTRUDER, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
                                vip_grpc_port]).stdout for _ in range(8)}
    assert codes == {"403"}, codes
    assert "403" not in {lab.run(FRIEND, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                                          "3", vip_grpc_port]).stdout for _ in range(4)}
    assert 'direction="outbound",policy="default/allow-default",result="deny"' in decisions(lab, "node1")
    assert 'direction="inbound",policy="default/allow-default",result="allow"' in decisions(lab, "node2")


def test_allow_nothing_denies_all_and_a_change_applies_to_the_next_connection(clean):
    lab = clean
    set_policies(lab, ("allow-nothing", {"selector": {"matchLabels": {"node": "node2", "pod": "pod-1"}}}))
    wait_for(lambda: refused(lab, FRIEND, TARGET), what="allow-nothing to reach node2")
    assert refused(lab, INTRUDER, TARGET)
    set_policies(lab, ("allow-nothing", {"selector": {"matchLabels": {"node": "node2", "pod": "pod-1"}},
                                         "rules": [{"to": [{"operation": {"ports": [8080]}}],
                                                    "when": [{"key": "source.namespace", "values": ["default"]}]}]}))
    wait_for(lambda: reaches(lab, FRIEND, TARGET), what="the changed policy to allow default on 8080")
    assert refused(lab, INTRUDER, TARGET)


def test_config_dump_shows_the_policies_in_force(clean):
    lab = clean
    set_policies(lab, ("audit-all", {"action": "AUDIT", "rules": [{}]}))
    wait_for(lambda: "default/audit-all" in mesh.admin_get(lab, "node2", "/config_dump").stdout,
             what="the policy in node2's config")
    dump = json.loads(mesh.admin_get(lab, "node2", "/config_dump").stdout)
    mine = {w["workload"]: w["policies"] for w in dump["authorization"]}
    assert mine["default/node2-pod-1"] == [{"policy": "default/audit-all", "action": "AUDIT",
                                            "scope": "namespace", "rules": 1, "checks": "connection"}]
    assert reaches(lab, INTRUDER, TARGET)  # AUDIT changes nothing


def test_ip_blocks_match_the_source_pod_through_the_tunnel(clean):
    lab = clean
    set_policies(lab, ("from-pod-1", {"selector": {"matchLabels": {"node": "node2", "pod": "pod-1"}},
                                      "rules": [{"from": [{"source": {"ipBlocks": [naming.pod_ip(1, 1)]}}]}]}))
    wait_for(lambda: refused(lab, INTRUDER, TARGET), what="the ipBlocks ALLOW to reach node2")
    assert reaches(lab, FRIEND, TARGET)
    assert refused(lab, "node2/pod-2", TARGET)   # same node, another address


def test_a_new_deny_applies_to_the_next_request_through_pooled_upstream_connections(clean):
    """HTTP through the L7 driver pools upstream connections per client: one authorized
    before a policy change must not carry the client's requests after it."""
    lab = clean
    url = f"http://{mesh.DEFAULT_SERVICE_VIP}:9090/"

    def codes(n):
        return {lab.run(FRIEND, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
                                 url]).stdout for _ in range(n)}
    assert "403" not in codes(8)  # every endpoint now has a pooled connection for FRIEND
    set_policies(lab, ("deny-friend", {"action": "DENY", "rules": [
        {"from": [{"source": {"ipBlocks": [naming.pod_ip(1, 1)]}}]}]}))
    wait_for(lambda: codes(1) == {"403"}, what="the DENY to reach the agents")
    assert codes(8) == {"403"}


def test_a_new_deny_closes_an_open_relayed_connection(clean, tmp_path):
    """As ztunnel: connections relayed at L4 are re-checked when policies change."""
    import subprocess
    lab = clean
    go = tmp_path / "go"
    ip = naming.pod_ip(2, 1)
    script = ("import http.client, os, time\n"
              f"c = http.client.HTTPConnection({ip!r}, 8080, timeout=5)\n"
              "c.request('GET', '/'); r = c.getresponse(); r.read(); print(r.status, flush=True)\n"
              f"while not os.path.exists({str(go)!r}): time.sleep(0.1)\n"
              "try:\n    c.request('GET', '/'); r = c.getresponse(); r.read(); print(r.status, flush=True)\n"
              "except (OSError, http.client.HTTPException) as e:\n    print('closed', type(e).__name__, flush=True)\n")
    deny = ("deny-intruder", {
        "action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/other/sa/intruder"]}}]}]})
    # the intruder's connections carry its own identity (node1 has its certificate) before we start
    set_policies(lab, deny)
    wait_for(lambda: refused(lab, INTRUDER, TARGET), what="the intruder's identity on the tunnel")
    set_policies(lab)
    wait_for(lambda: reaches(lab, INTRUDER, TARGET), what="the DENY to be gone")
    proc = subprocess.Popen(lab.exec_argv(lab.target(INTRUDER), ["python3", "-c", script]), stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "200"
        set_policies(lab, deny)
        wait_for(lambda: refused(lab, INTRUDER, TARGET), what="the DENY to reach node2")
        go.touch()
        line = proc.stdout.readline()
        log = Path(lab.names.run_dir, "logs", "agent-node2.log").read_text()[-3000:]
        assert line.startswith("closed"), f"the open connection survived the DENY: {line} {log}"
    finally:
        proc.kill()
        proc.wait(10)
    assert reaches(lab, FRIEND, TARGET)
    metrics = mesh.admin_get(lab, "node2", "/stats/prometheus").stdout
    assert 'reason="authz_revoked"' in metrics
