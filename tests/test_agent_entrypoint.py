"""daemonset/image/agent-entrypoint.py, the agent container's entrypoint: the per-node
bootstrap values it fills in, the agent command it execs, and the taint patch. The
Kubernetes API is not called here (no cluster): the API calls are the untested part."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)

SCRIPT = Path(__file__).resolve().parents[1] / "daemonset" / "image" / "agent-entrypoint.py"


@cache
def entrypoint():
    spec = importlib.util.spec_from_file_location("agent_entrypoint", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pod_cidrs_come_from_the_node_ipv4_only():
    ep = entrypoint()
    node = {"metadata": {"name": "n1"}, "spec": {"podCIDR": "10.244.1.0/24",
                                                 "podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]}}
    assert ep.pod_cidrs_from_node(node) == ["10.244.1.0/24"]
    assert ep.pod_cidrs_from_node({"spec": {"podCIDR": "10.244.2.0/24"}}) == ["10.244.2.0/24"]
    with pytest.raises(ep.EntrypointError, match="set HOSTMESH_POD_CIDRS"):
        ep.pod_cidrs_from_node({"metadata": {"name": "n1"}, "spec": {}})


def test_pod_cidrs_from_the_environment_are_checked():
    ep = entrypoint()
    assert ep.pod_cidrs_from_env("10.244.1.0/24, 10.245.0.0/24") == ["10.244.1.0/24", "10.245.0.0/24"]
    with pytest.raises(ep.EntrypointError, match="not an IPv4 CIDR"):
        ep.pod_cidrs_from_env("10.244.1.1/24")
    with pytest.raises(ep.EntrypointError, match="lists no CIDR"):
        ep.pod_cidrs_from_env(" , ")


def test_the_rendered_bootstrap_gets_the_node_values_and_keeps_the_files():
    ep = entrypoint()
    doc = {"capture": {"mode": "ebpf", "meshCIDRs": ["10.96.0.0/12"]}, "stateDir": "/var/lib/hostmesh"}
    out = ep.render_bootstrap(doc, {"NODE_NAME": "n1", "HOST_IP": "10.0.0.7"}, ["10.244.1.0/24"])
    assert out["node"] == "n1" and out["stateDir"] == "/var/lib/hostmesh"
    assert out["capture"] == {"mode": "ebpf", "meshCIDRs": ["10.96.0.0/12"], "podCIDRs": ["10.244.1.0/24"],
                              "redirectAddress": "10.0.0.7"}
    assert doc == {"capture": {"mode": "ebpf", "meshCIDRs": ["10.96.0.0/12"]}, "stateDir": "/var/lib/hostmesh"}
    # values the file sets win; iptables has no redirect address
    pinned = {"capture": {"mode": "ebpf", "podCIDRs": ["10.1.0.0/24"], "redirectAddress": "169.254.1.1"}}
    out = ep.render_bootstrap(pinned, {"NODE_NAME": "n1", "HOST_IP": "10.0.0.7"}, ["10.244.1.0/24"])
    assert out["capture"] == pinned["capture"]
    out = ep.render_bootstrap({"capture": {"mode": "iptables"}}, {"NODE_NAME": "n1", "HOST_IP": "10.0.0.7"}, None)
    assert out["capture"] == {"mode": "iptables"}
    assert ep.needs_pod_cidrs({"capture": {"mode": "iptables"}}) and not ep.needs_pod_cidrs({"capture": {"mode": "none"}})
    with pytest.raises(ep.EntrypointError, match="NODE_NAME is not set"):
        ep.render_bootstrap({}, {}, None)


def test_untaint_removes_only_our_taint_guarded_by_a_test():
    ep = entrypoint()
    other = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}
    ours = {"key": ep.TAINT_KEY, "effect": "NoSchedule"}
    patch = ep.untaint_patch({"spec": {"taints": [other, ours]}})
    assert patch == [{"op": "test", "path": "/spec/taints", "value": [other, ours]},
                     {"op": "replace", "path": "/spec/taints", "value": [other]}]
    assert ep.untaint_patch({"spec": {"taints": [other]}}) is None
    assert ep.untaint_patch({"spec": {}}) is None


def test_the_agent_verb_writes_a_private_bootstrap_and_execs_the_agent(tmp_path):
    """The whole verb, with HOSTMESH_POD_CIDRS (no API call) and a stand-in `hostmesh`."""
    boot = tmp_path / "agent.yaml"
    boot.write_text(yaml.safe_dump({"capture": {"mode": "iptables", "meshCIDRs": ["10.96.0.0/12"]},
                                    "controlPlane": ["cp:15010"]}))
    fake = tmp_path / "hostmesh"
    fake.write_text("#!/bin/sh\necho \"$@\"\ncat \"$3\"\n")
    fake.chmod(0o755)
    rendered = tmp_path / "rendered.yaml"
    env = {"PATH": os.environ["PATH"], "NODE_NAME": "n1", "HOSTMESH_POD_CIDRS": "10.244.1.0/24",
           "HOSTMESH_BOOTSTRAP": str(boot), "HOSTMESH_BIN": str(fake), "HOSTMESH_RENDERED": str(rendered)}
    r = subprocess.run([sys.executable, str(SCRIPT), "agent", "--agent-log-level", "debug"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    first, _, rest = r.stdout.partition("\n")
    assert first == f"agent --config {rendered} --agent-log-level debug"
    assert yaml.safe_load(rest)["capture"]["podCIDRs"] == ["10.244.1.0/24"]
    assert stat.S_IMODE(rendered.stat().st_mode) == 0o600


def test_errors_are_one_line_for_kubectl_logs(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOSTMESH_BOOTSTRAP": str(tmp_path / "missing.yaml"), "NODE_NAME": "n1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "agent"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.startswith("agent-entrypoint: error: ") and "cannot read the bootstrap" in r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr
