"""vagrant/: the provisioning scripts (one per role) run here exactly as in the VMs, only
under a root directory and without systemctl; the Vagrantfile is checked as far as this
host can (ruby -c when ruby is installed; Vagrant itself cannot run here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nodeagent import bootstrap
from tests.conftest import HOSTMESH, IN_CI
from tests.test_hostinstall import sources, tree  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
PROVISION = REPO / "vagrant" / "provision"


@pytest.mark.parametrize("script", ["controlplane.sh", "node.sh", "lib.sh"])
def test_scripts_parse_and_pass_shellcheck_when_available(script):
    path = PROVISION / script
    assert os.access(path, os.X_OK) or script == "lib.sh"  # lib.sh is sourced, not run
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    if shutil.which("shellcheck") or IN_CI:   # ./quickstart installs it: CI must not skip it
        r = subprocess.run(["shellcheck", "-x", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


@pytest.mark.skipif(shutil.which("ruby") is None and not IN_CI,
                    reason="ruby is not installed: the Vagrantfile is not parsed")
def test_vagrantfile_parses():
    r = subprocess.run(["ruby", "-c", str(REPO / "vagrant" / "Vagrantfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(PROVISION / script)], env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                          text=True, timeout=120)


def test_the_role_scripts_install_the_vms_and_uninstall_cleanly(tmp_path, sources):
    share, cp_root, node_root = tmp_path / "share", tmp_path / "cp", tmp_path / "worker1"
    cp_root.mkdir()
    node_root.mkdir()
    common = {"HOSTMESH_NO_START": "1", "HOSTMESH_BIN": HOSTMESH, "HOSTMESH_SHARE": str(share)}
    r = run("controlplane.sh", {**common, "HOSTMESH_ROOT": str(cp_root), "HOSTMESH_NODES": "worker1 worker2",
                                "HOSTMESH_TLS_SAN": "192.168.56.10"})
    assert r.returncode == 0, r.stderr
    tokens = sorted(p.name for p in (cp_root / "etc/hostmesh/tokens").iterdir())
    assert tokens == ["worker1.token", "worker2.token"]
    token = (share / "tokens" / "worker1.token").read_text()
    again = run("controlplane.sh", {**common, "HOSTMESH_ROOT": str(cp_root), "HOSTMESH_NODES": "worker1 worker2",
                                    "HOSTMESH_TLS_SAN": "192.168.56.10"})
    assert "no change" in again.stdout and (share / "tokens" / "worker1.token").read_text() == token
    # what the control plane VM hands over once its CA exists
    shutil.copy(sources["bundle"], share / "root-bundle.pem")
    node_env = {**common, "HOSTMESH_ROOT": str(node_root), "HOSTMESH_NODE": "worker1",
                "HOSTMESH_CONTROL_PLANE": "192.168.56.10:15010", "HOSTMESH_POD_CIDR": "10.244.1.0/24",
                "HOSTMESH_MESH_CIDRS": "10.96.0.0/16 10.244.1.0/24 10.244.2.0/24"}
    r = run("node.sh", node_env)
    assert r.returncode == 0, r.stderr
    boot = bootstrap.build(bootstrap.load_file(str(node_root / "etc/hostmesh/agent.yaml")), {})
    assert boot.node == "worker1" and boot.mesh_cidrs == ("10.96.0.0/16", "10.244.1.0/24", "10.244.2.0/24")
    assert (node_root / "etc/hostmesh/token").read_text().strip() == token.strip()
    for root in (cp_root, node_root):
        assert subprocess.run([HOSTMESH, "uninstall", "--root", str(root)], capture_output=True).returncode == 0
        assert tree(root) == {}


def test_node_script_says_what_is_missing(tmp_path):
    r = run("node.sh", {"HOSTMESH_NO_START": "1", "HOSTMESH_BIN": HOSTMESH, "HOSTMESH_SHARE": str(tmp_path),
                        "HOSTMESH_ROOT": str(tmp_path), "HOSTMESH_NODE": "worker1", "HOSTMESH_POD_CIDR": "10.244.1.0/24",
                        "HOSTMESH_MESH_CIDRS": "10.96.0.0/16"})
    assert r.returncode != 0 and "HOSTMESH_CONTROL_PLANE=HOST:PORT is required" in r.stderr
