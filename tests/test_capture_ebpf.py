"""The eBPF capture backend: layout and safety checks (no root), then a 2x2 lab with eBPF agents.

The shared capture suite (tests/test_mesh_l4.py, parametrized over CAPTURE_BACKENDS) covers
VIP/pod-IP capture, original destination, no loop, fail closed, restart cycles, clean stop,
integrity, half-close and concurrency for both backends. This file covers what is specific
to eBPF: what is attached where (bpftool), pins and their adoption across restarts, removal
without a trace, host cgroups selected for capture, fail-closed inbound, the counters,
--capture auto and --dump-bpf.

Lab safety: programs are only ever attached to cgroups below hm-<lab>/ and pins only live
under /sys/fs/bpf/hostmesh/<lab>-<node>/; the module fixture removes the lab (which
unpins the lab's pins: a stopped agent leaves its capture installed by design) and then
unpins anything of the lab that is still there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from meshlab import cgroups as labcg
from meshlab import mesh
from meshlab.lab import Lab, Target
from nodeagent.capture import CaptureSpec, make_capture
from nodeagent.capture import ebpf_maps as m
from nodeagent.capture.ebpf_loader import PIN_ROOT, PROGRAMS, BpfLoader
from nodeagent.errors import CaptureError
from tests.conftest import require_root, unique_lab_name, wait_for

BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"
MESH = ("198.19.0.0/16", "198.18.1.0/24", "198.18.2.0/24")


# ======================================================================================
# no root
# ======================================================================================


def _c_struct_fields(header: str, name: str) -> list[str]:
    body = re.search(r"struct %s \{(.*?)\};" % name, header, re.DOTALL).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.DOTALL)
    return [re.search(r"(\w+)\s*(\[[^\]]*\])?\s*$", decl.strip()).group(1)
            for decl in body.split(";") if decl.strip()]


@pytest.mark.parametrize("cname, ctype", [
    ("hm_config", m.HmConfig), ("hm_cidr_key", m.HmCidrKey), ("hm_tuple", m.HmTuple),
    ("hm_origdst", m.HmOrigdst), ("hm_meta", m.HmMeta), ("hm_attachment", m.HmAttachment),
    ("hm_sock_key", m.HmSockKey), ("hm_flow", m.HmFlow),
])
def test_ctypes_mirror_matches_the_c_header(cname, ctype):
    header = (BPF_DIR / "lib" / "hostmesh.h").read_text()
    assert _c_struct_fields(header, cname) == [f[0] for f in ctype._fields_]


def test_counter_names_follow_the_c_enum():
    header = (BPF_DIR / "lib" / "hostmesh.h").read_text()
    enum = re.search(r"enum hm_counter \{(.*?)\};", header, re.DOTALL).group(1)
    names = [n.lower()[5:] for n in re.findall(r"^\s*(HM_C_\w+)", enum, re.MULTILINE) if n != "HM_C_MAX"]
    assert tuple(names) == m.COUNTERS
    assert f"#define HM_LAYOUT_VERSION {m.HM_LAYOUT_VERSION}" in header


def test_every_program_file_has_an_spdx_header_and_no_splicing():
    for p in PROGRAMS.values():
        text = (BPF_DIR / p.file).read_text()
        assert text.startswith("// SPDX-License-Identifier: GPL-2.0"), p.file
        assert f"int {p.func}(" in text and len(p.func) <= 15
    for h in (BPF_DIR / "lib").glob("*.h"):
        assert "SPDX-License-Identifier" in h.read_text().splitlines()[0], h


def test_dump_bpf_prints_the_final_source():
    r = subprocess.run([sys.executable, "-m", "nodeagent.capture.ebpf", "--dump-bpf", "--instance", "x"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    for p in PROGRAMS.values():
        assert f"bpf/{p.file}" in r.stdout and f"int {p.func}(" in r.stdout
    assert '#include "lib/' not in r.stdout  # our headers are inlined
    assert "struct hm_config {" in r.stdout and '-DHM_PIN_DIR="/sys/fs/bpf/hostmesh/x"' in r.stdout


def test_spec_fields_for_ebpf_are_validated():
    with pytest.raises(CaptureError, match="redirect_address"):
        CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=MESH, redirect_address="gateway")
    with pytest.raises(CaptureError, match="instance"):
        CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=MESH, instance="../etc")
    with pytest.raises(CaptureError, match="cgroups"):
        CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=MESH, cgroups="hm-lab/node1/pod-1")
    s = CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=MESH, cgroups=["a/b"], instance="lab-node1")
    assert s.cgroups == ("a/b",) and s.to_dict()["cgroups"] == ["a/b"]


def test_never_the_root_cgroup_nor_one_containing_the_agent(tmp_path):
    from nodeagent import cgroups as cgmod
    from nodeagent.capture.ebpf import EbpfCapture
    root = cgmod.find_cgroup2_mount()
    if root is None:
        pytest.skip("no cgroup v2 mount")
    for bad in ("/", root, "..", "/etc"):
        cap = EbpfCapture(CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=MESH, cgroups=(bad,)),
                          proxy_cgroup=os.path.join(root, "hm-nolab/node1/system"))
        with pytest.raises(CaptureError, match="not below the cgroup v2 hierarchy"):
            cap.capture_cgroups()
    cap = EbpfCapture(CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=MESH, cgroups=("hm-nolab/node1",)),
                      proxy_cgroup=os.path.join(root, "hm-nolab/node1/system"))
    with pytest.raises(CaptureError, match="contains the agent itself"):
        cap.capture_cgroups()
    # the agent's cgroup is only used when it is not the root
    assert EbpfCapture(CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=MESH),
                       proxy_cgroup=root).proxy_cgroup() is None


def test_auto_falls_back_to_iptables_with_a_logged_reason(monkeypatch, caplog):
    from nodeagent.capture import ebpf
    from nodeagent.capture.ebpf_auto import AutoCapture
    spec = CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=MESH)
    monkeypatch.setattr(ebpf, "probe", lambda spec=None: (False, "bcc is not importable (test)"))
    with caplog.at_level(logging.WARNING, logger="hostmesh.capture"):
        cap = make_capture("auto", spec)
    assert isinstance(cap, AutoCapture) and cap.backend == "iptables"
    assert "bcc is not importable (test)" in caplog.text and "using iptables" in caplog.text
    monkeypatch.setattr(ebpf, "probe", lambda spec=None: (True, "eBPF prerequisites present"))
    assert make_capture("auto", spec).backend == "ebpf"


def test_auto_falls_back_when_the_ebpf_install_fails(monkeypatch, caplog):
    from nodeagent.capture import ebpf
    from nodeagent.capture.iptables import IptablesCapture
    spec = CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=MESH)
    monkeypatch.setattr(ebpf, "probe", lambda spec=None: (True, "ok"))

    def boom(self):
        raise CaptureError("ebpf capture: the kernel refused program hm_connect4 (test)")

    installed = []
    monkeypatch.setattr(ebpf.EbpfCapture, "install", boom)
    monkeypatch.setattr(IptablesCapture, "install", lambda self: installed.append(self))
    cap = make_capture("auto", spec)
    with caplog.at_level(logging.WARNING, logger="hostmesh.capture"):
        cap.install()
    assert cap.backend == "iptables" and installed
    assert "refused program hm_connect4 (test)" in cap.reason and "eBPF install failed" in caplog.text


# ======================================================================================
# the lab (root)
# ======================================================================================

def _pins_of(lab: Lab) -> list[str]:
    try:
        return sorted(d for d in os.listdir(PIN_ROOT) if d.startswith(f"{lab.name}-"))
    except FileNotFoundError:
        return []


def _ebpf_lab(accelerate: bool):
    """A 2x2 lab with eBPF agents; always removed, pins included."""
    require_root("the eBPF lab")
    lab = Lab(unique_lab_name())
    lab.capture, lab.accelerate = "ebpf", accelerate
    try:
        lab.up(2, 2, capture="ebpf")
        yield lab
    finally:
        try:
            lab.down()
        finally:
            # a stopped agent leaves its pins by design (fail closed) and lab down removes the
            # lab's; never leak one that is still there
            for inst in _pins_of(lab):
                BpfLoader(inst).unpin_all()
                logging.getLogger(__name__).warning("unpinned %s after lab down (agent was SIGKILLed)", inst)


@pytest.fixture(scope="module")
def L():
    yield from _ebpf_lab(accelerate=False)


def capture_view(lab: Lab, node: str) -> dict:
    r = mesh.admin_get(lab, node, "/capture")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def curl(lab: Lab, target: str | Target, url: str, timeout: float = 5) -> subprocess.CompletedProcess:
    argv = ["curl", "-sS", "--max-time", str(timeout), url]
    if isinstance(target, Target):
        return subprocess.run(lab.exec_argv(target, argv), capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    return lab.run(target, argv, timeout=30)


def bpftool_tree(lab: Lab, sub: str = "") -> dict[str, list[str]]:
    """cgroup path -> sorted '<attach type> <prog name>' under the lab's cgroup dir."""
    top = labcg.cgroup_root() / lab.names.cgroup_dir / sub
    out = subprocess.run(["bpftool", "-j", "cgroup", "tree", str(top)], capture_output=True, text=True, check=True)
    return {c["cgroup"]: sorted(f"{p['attach_type']} {p['name']}" for p in c["programs"])
            for c in json.loads(out.stdout or "[]")}


def kill_agent(lab: Lab, node: str, sig: int) -> None:
    for pid in mesh.agent_pids(lab, node):
        os.kill(pid, sig)
    deadline = time.monotonic() + 15
    while mesh.agent_pids(lab, node) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mesh.agent_pids(lab, node)
    # an exiting process loses its cmdline (exit_mm) before its sockets close (exit_files):
    # wait until the listeners are really gone, or the kernel may still complete handshakes
    while time.monotonic() < deadline:
        ss = lab.run(node, ["ss", "-Hltn", "( sport = :15001 or sport = :15006 )"]).stdout
        if not ss.strip():
            return
        time.sleep(0.05)
    pytest.fail(f"the agent's listeners on {node} did not close")


def start_agent(lab: Lab, node: str, capture: str = "ebpf", config: Path | None = None) -> None:
    if config is None:
        proc = mesh.spawn_agent(lab, node, capture)
    else:
        proc = lab.spawn(lab.target(node), [sys.executable, "-m", "hostmesh.cli", "agent", "--config", str(config)],
                         f"agent-{node}")
    mesh.wait_ready(lab, node, proc)


def metric(lab: Lab, node: str, name: str, **labels: str) -> float:
    text = mesh.admin_get(lab, node, "/stats/prometheus").stdout
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.lab
def test_programs_sit_only_on_the_lab_cgroups(L):
    root_progs = subprocess.run(["bpftool", "-j", "cgroup", "show", str(labcg.cgroup_root())],
                                capture_output=True, text=True, check=True).stdout
    assert "hm_" not in root_progs  # nothing on the machine's root cgroup
    top = str(labcg.cgroup_root() / L.names.cgroup_dir)
    tree = bpftool_tree(L)
    capture = ["cgroup_inet4_connect hm_connect4", "cgroup_inet6_connect hm_connect6", "cgroup_sock_ops hm_sockops"]
    want = {f"{top}/{node}/{pod}": capture for node in ("node1", "node2") for pod in ("pod-1", "pod-2")}
    want.update({f"{top}/{node}/system": ["cgroup_getsockopt hm_getsockopt"] for node in ("node1", "node2")})
    assert tree == want
    for node in ("node1", "node2"):
        tc = L.run(node, ["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
        assert f"hostmesh:{L.name}-{node}:" in tc and "hm_tc_inbound" in tc
        assert "fwmark 0x150060 lookup 15006" in L.run(node, ["ip", "rule"]).stdout
    assert _pins_of(L) == [f"{L.name}-node1", f"{L.name}-node2"]


@pytest.mark.lab
def test_counters_count_outbound_and_inbound(L):
    before1, before2 = capture_view(L, "node1")["counters"], capture_view(L, "node2")["counters"]
    prom_before = metric(L, "node1", "hostmesh_agent_capture_ebpf_events_total", event="connect_redirected")
    for url in ("http://198.19.0.10/", "http://198.18.2.1:8080/", "http://198.18.1.2:8080/"):
        r = curl(L, "node1/pod-1", url)
        assert r.returncode == 0, r.stderr
    after1, after2 = capture_view(L, "node1")["counters"], capture_view(L, "node2")["counters"]
    assert after1["connect_redirected"] - before1["connect_redirected"] == 3
    assert after1["sockops_moved"] - before1["sockops_moved"] == 3
    assert after1["origdst_hit"] - before1["origdst_hit"] == 3
    assert after1["connect_error"] == after1["sockops_miss"] == 0
    assert after2["inbound_assigned"] - before2["inbound_assigned"] >= 1  # the VIP may pick a node1 pod
    assert after2["inbound_established"] > before2["inbound_established"]
    assert metric(L, "node1", "hostmesh_agent_capture_ebpf_events_total",
                  event="connect_redirected") - prom_before == 3
    view = capture_view(L, "node1")
    assert view["backend"] == "ebpf" and view["installed"] and view["last_verification"]["ok"]
    assert view["inbound_listener"] == {**view["inbound_listener"], "found": True, "transparent": True,
                                        "in_sockmap": True}
    assert view["original_destination"].startswith("cgroup/getsockopt")


@pytest.mark.lab
def test_restart_adopts_the_pinned_programs_and_maps(L):
    before = capture_view(L, "node1")
    pinned_map_ids = {name: m.Map.open_pinned(m.MAPS[name], f"{PIN_ROOT}/{L.name}-node1/{name}") for name in m.MAPS}
    ids = {name: mp.id for name, mp in pinned_map_ids.items()}
    for mp in pinned_map_ids.values():
        mp.close()
    kill_agent(L, "node1", signal.SIGKILL)
    start_agent(L, "node1")
    after = capture_view(L, "node1")
    assert after["programs_loaded"] == "adopted"
    assert {k: v["id"] for k, v in after["programs"].items()} == {k: v["id"] for k, v in before["programs"].items()}
    assert after["attachments"] == before["attachments"] and after["tc"] == before["tc"]
    assert after["sk_lookup"] == before["sk_lookup"] and after["sk_lookup"]["netns_ino"]  # the same link, adopted
    again = {name: m.Map.open_pinned(m.MAPS[name], f"{PIN_ROOT}/{L.name}-node1/{name}") for name in m.MAPS}
    assert {name: mp.id for name, mp in again.items()} == ids
    for mp in again.values():
        mp.close()
    # counters survived the restart (same maps), and capture works with the new listener
    assert after["counters"]["connect_redirected"] >= before["counters"]["connect_redirected"]
    r = curl(L, "node1/pod-1", "http://198.18.2.2:8080/")
    assert r.returncode == 0 and json.loads(r.stdout)["pod"] == "pod-2"
    assert capture_view(L, "node1")["inbound_listener"]["in_sockmap"]


@pytest.mark.lab
def test_inbound_fails_closed_when_the_agent_is_sigkilled(L):
    kill_agent(L, "node2", signal.SIGKILL)
    try:
        ld = BpfLoader(f"{L.name}-node2")
        ld.load(compile=False)
        try:
            dropped = ld.counters()["inbound_no_listener"]
            # the node itself is not captured outbound: its connection goes straight to node2,
            # where the SYN must be dropped, never forwarded to the pod in plaintext
            r = curl(L, "node1", "http://198.18.2.1:8080/", timeout=2)
            assert r.returncode != 0 and not r.stdout, (r.returncode, r.stdout)
            assert ld.counters()["inbound_no_listener"] > dropped, (r.returncode, r.stderr, ld.counters())
        finally:
            ld.close()
    finally:
        start_agent(L, "node2")
    r = curl(L, "node1", "http://198.18.2.1:8080/")
    assert r.returncode == 0 and json.loads(r.stdout)["source"]["address"] == "198.18.0.12"


@pytest.mark.lab
def test_a_selected_host_cgroup_goes_through_the_proxy_and_others_do_not(L):
    rel = f"{L.names.cgroup_dir}/node1/hostsvc"
    labcg.create(rel)
    cfg = mesh.agent_bootstrap(L, "node1", "ebpf")
    doc = yaml.safe_load(cfg.read_text())
    doc["capture"]["cgroups"].append(rel)
    custom = cfg.with_name("agent-node1-hostsvc.yaml")
    custom.write_text(yaml.safe_dump(doc, sort_keys=False))
    ns = L.names.node_ns("node1")
    inside = Target("node1", None, ns, rel)
    outside = L.target("node1")  # the node's system cgroup (where the agent runs)
    try:
        kill_agent(L, "node1", signal.SIGTERM)
        start_agent(L, "node1", config=custom)
        assert bpftool_tree(L, "node1/hostsvc") == {
            str(labcg.cgroup_root() / rel): ["cgroup_inet4_connect hm_connect4", "cgroup_inet6_connect hm_connect6",
                                             "cgroup_sock_ops hm_sockops"]}
        opened = lambda: metric(L, "node1", "hostmesh_tcp_connections_opened_total", reporter="source")
        n0 = opened()
        r = curl(L, inside, "http://198.19.0.10/")       # the VIP only exists inside the mesh
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["pod"].startswith("pod-")
        r = curl(L, inside, "http://198.18.1.2:8080/")
        assert r.returncode == 0 and json.loads(r.stdout)["pod"] == "pod-2"
        assert opened() - n0 == 2
        r = curl(L, outside, "http://198.19.0.10/", timeout=2)   # not captured: no route to a VIP
        assert r.returncode != 0
        r = curl(L, outside, "http://198.18.1.2:8080/")          # not captured: direct
        assert r.returncode == 0 and json.loads(r.stdout)["pod"] == "pod-2"
        assert opened() - n0 == 2
    finally:
        kill_agent(L, "node1", signal.SIGKILL)  # the new agent must drop the stale attachment itself
        start_agent(L, "node1")
        try:
            os.rmdir(labcg.cgroup_root() / rel)
        except OSError:
            pass
    # the standard config no longer lists hostsvc: the restarted agent detached it
    assert not bpftool_tree(L, "node1").get(str(labcg.cgroup_root() / rel))


@pytest.mark.lab
def test_auto_mode_picks_ebpf_here(L):
    kill_agent(L, "node2", signal.SIGTERM)
    try:
        start_agent(L, "node2", capture="auto")
        view = capture_view(L, "node2")
        assert view["selected_by"] == "auto" and view["backend"] == "ebpf", view.get("reason")
        r = curl(L, "node2/pod-1", "http://198.18.1.1:8080/")
        assert r.returncode == 0 and json.loads(r.stdout)["source"]["address"] == "198.18.0.11"
    finally:
        kill_agent(L, "node2", signal.SIGTERM)
        start_agent(L, "node2")


@pytest.mark.lab
def test_a_changed_capture_mode_replaces_the_old_backend(L):
    """Stop, then start with iptables: the eBPF capture is removed once iptables is in
    place; back to eBPF: the iptables chains go. Never two backends, never none."""
    kill_agent(L, "node2", signal.SIGTERM)
    try:
        start_agent(L, "node2", capture="iptables")
        assert f"{L.name}-node2" not in _pins_of(L)
        assert all(not progs for progs in bpftool_tree(L, "node2").values())
        assert "HOSTMESH-PREROUTING" in L.run("node2", ["iptables-save", "-t", "nat"]).stdout
        r = curl(L, "node1/pod-1", "http://198.18.2.1:8080/")
        assert r.returncode == 0, r.stderr
        kill_agent(L, "node2", signal.SIGTERM)
        start_agent(L, "node2")
        assert "HOSTMESH" not in L.run("node2", ["iptables-save", "-t", "nat"]).stdout
        assert f"{L.name}-node2" in _pins_of(L)
    finally:
        if not mesh.agent_running(L, "node2"):
            start_agent(L, "node2")
    assert capture_view(L, "node2")["last_verification"]["ok"]


def uninstall(lab: Lab, node: str) -> None:
    """`hostmesh agent --uninstall`, twice: the second run finds nothing and succeeds."""
    for _ in range(2):
        r = mesh.uninstall_agent(lab, node, "ebpf")
        assert r.returncode == 0 and "capture removed" in r.stdout, r.stdout + r.stderr


@pytest.mark.lab
def test_sigterm_keeps_capture_and_uninstall_removes_everything(L):
    node2_ids = {v["id"] for v in capture_view(L, "node2")["programs"].values()}
    attached = bpftool_tree(L, "node2")
    kill_agent(L, "node2", signal.SIGTERM)
    try:
        assert bpftool_tree(L, "node2") == attached and f"{L.name}-node2" in _pins_of(L)  # a stop keeps it
        r = curl(L, "node2/pod-1", "http://198.18.1.1:8080/")
        assert r.returncode == 7, (r.returncode, r.stdout)  # fail closed: refused, not sent around the proxy
        uninstall(L, "node2")
        tree = bpftool_tree(L, "node2")
        assert all(not progs for progs in tree.values()), tree
        assert f"{L.name}-node2" not in _pins_of(L)
        assert "hm_tc_inbound" not in L.run("node2", ["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
        assert "clsact" not in L.run("node2", ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert "15006" not in L.run("node2", ["ip", "rule"]).stdout
        assert "table 15006" not in L.run("node2", ["ip", "route", "show", "table", "all"]).stdout
        assert not netns_links(L, "node2")
        loaded = {p["id"] for p in json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                                             text=True, check=True).stdout)}
        assert not node2_ids & loaded  # unpinned and detached: the kernel freed node2's programs
        # without capture nothing intercepts: node1 reaches node2's pod directly
        r = curl(L, "node1", "http://198.18.2.1:8080/")
        assert r.returncode == 0 and json.loads(r.stdout)["source"]["address"] == "198.18.0.11"
    finally:
        start_agent(L, "node2")
    assert capture_view(L, "node2")["last_verification"]["ok"]


@pytest.mark.lab
def test_verify_notices_a_detached_program_and_reconcile_repairs_it(L):
    from nodeagent.capture import ebpf_sys as sysb
    ld = BpfLoader(f"{L.name}-node1")
    ld.load(compile=False)
    pod = str(labcg.cgroup_root() / L.names.pod_cgroup("node1", "pod-2"))
    try:
        ld.detach_cgroup(pod, [sysb.ATTACH_CGROUP_INET4_CONNECT])
        spec = CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=MESH, instance=f"{L.name}-node1",
                           cgroups=(L.names.pod_cgroup("node1", "pod-1"), L.names.pod_cgroup("node1", "pod-2")),
                           redirect_address="169.254.1.1")
        from nodeagent.capture.ebpf import EbpfCapture
        cap = EbpfCapture(spec, netns=L.names.node_ns("node1"),
                          proxy_cgroup=str(labcg.cgroup_root() / L.names.node_cgroup("node1")))
        problems = cap.verify().problems
        assert f"hm_connect4 is not attached to {pod}" in problems
    finally:
        ld.close()
    # the agent's own reconcile loop (every 10 s) puts it back
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        if "cgroup_inet4_connect hm_connect4" in bpftool_tree(L, "node1/pod-2").get(pod, []):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the agent did not re-attach hm_connect4")
    r = curl(L, "node1/pod-2", "http://198.19.0.10/")
    assert r.returncode == 0


def netns_links(lab: Lab, node: str) -> list[dict]:
    """BPF links attached to the node's network namespace (sk_lookup)."""
    ino = int(lab.run(node, ["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout)
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True,
                                      check=True).stdout or "[]")
    return [ln for ln in links if ln.get("netns_ino") == ino]


@pytest.mark.lab
def test_verify_notices_a_detached_sk_lookup_and_reconcile_repairs_it(L):
    (link,) = netns_links(L, "node2")
    assert link["attach_type"] == "sk_lookup" and link["prog_id"] == capture_view(L, "node2")["programs"]["sk_lookup"]["id"]
    ld = BpfLoader(f"{L.name}-node2")
    try:
        assert ld.detach_netns()  # what another tool's `bpftool link detach` would do
    finally:
        ld.close()
    assert not netns_links(L, "node2")
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline and not netns_links(L, "node2"):
        time.sleep(0.5)
    assert netns_links(L, "node2"), "the agent did not re-attach hm_sk_lookup"
    r = curl(L, "node1", "http://198.18.2.1:8080/")
    assert r.returncode == 0 and json.loads(r.stdout)["source"]["address"] == "198.18.0.12"  # via node2's proxy


@pytest.mark.lab
def test_a_failed_compile_leaves_nothing_pinned(tmp_path):
    import shutil
    bad = tmp_path / "bpf"
    shutil.copytree(BPF_DIR, bad)
    (bad / "sockops.c").write_text((bad / "sockops.c").read_text().replace("return 1;", "return 1", 1))
    instance = f"tbroken{os.getpid()}"
    with pytest.raises(CaptureError, match="could not compile bpf/sockops.c"):
        with BpfLoader(instance, bpf_dir=bad) as ld:
            ld.load()
    assert not os.path.exists(f"{PIN_ROOT}/{instance}")


# ======================================================================================
# same-node acceleration (sockops_accel + sk_msg on the hm_socks sockhash)
# ======================================================================================

ACCEL_PROGS = ["cgroup_inet4_connect hm_connect4", "cgroup_inet6_connect hm_connect6",
               "cgroup_sock_ops hm_sock_accel", "cgroup_sock_ops hm_sockops"]

# run in a pod: connect, one HTTP request, print the local address, hold the connection until
# stdin closes, then a second request on it and close
HOLD = r"""
import socket, sys
def request(s):
    s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, _, body = buf.partition(b"\r\n\r\n")
    n = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(body) < n:
        body += s.recv(65536)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
request(s)
print("%s:%d" % s.getsockname(), flush=True)
sys.stdin.readline()
request(s)
s.close()
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def LA():
    """The eBPF lab with same-node acceleration on."""
    yield from _ebpf_lab(accelerate=True)


def socks(lab: Lab, node: str) -> set[str]:
    """hm_socks of `node` as 'local -> remote' strings."""
    ld = BpfLoader(f"{lab.name}-{node}")
    ld.load(compile=False)
    try:
        return {f"{m.ip4_text(k.local_ip4)}:{m.port_host(k.local_port)} -> "
                f"{m.ip4_text(k.remote_ip4)}:{m.port_host(k.remote_port)}" for k in ld.maps["hm_socks"].keys()}
    finally:
        ld.close()


class Held:
    """A connection from a pod held open by HOLD (a context manager)."""

    def __init__(self, lab: Lab, pod: str, host: str, port: int) -> None:
        self.proc = subprocess.Popen(lab.exec_argv(lab.target(pod), [sys.executable, "-c", HOLD, host, str(port)]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> str:
        line = self.proc.stdout.readline().strip()
        assert line, self.proc.stderr.read()
        return line  # the client's address

    def second_request_and_close(self) -> None:
        out, err = self.proc.communicate("\n", timeout=20)
        assert self.proc.returncode == 0 and "done" in out, err

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def accel_counters(lab: Lab, node: str) -> dict[str, int]:
    return {k: v for k, v in capture_view(lab, node)["counters"].items() if k.startswith("accel_")}


@pytest.mark.lab
def test_accelerated_agents_attach_sockops_accel_and_sk_msg(LA):
    top = str(labcg.cgroup_root() / LA.names.cgroup_dir)
    want = {f"{top}/{node}/{pod}": ACCEL_PROGS for node in ("node1", "node2") for pod in ("pod-1", "pod-2")}
    want.update({f"{top}/{node}/system": ["cgroup_getsockopt hm_getsockopt", "cgroup_sock_ops hm_sock_accel"]
                 for node in ("node1", "node2")})
    assert bpftool_tree(LA) == want
    for node in ("node1", "node2"):
        view = capture_view(LA, node)
        acc = view["acceleration"]
        assert acc["enabled"] and acc["sk_msg_attached"] == [view["programs"]["sk_msg"]["id"]], acc
        assert view["last_verification"]["ok"], view["last_verification"]
        assert "hm_socks" in view["pinned"] and "prog_sk_msg" in view["pinned"]
    r = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(capture_view(LA, "node1")["programs"]["sk_msg"]["id"])],
                       capture_output=True, text=True, check=True)
    assert json.loads(r.stdout)["type"] == "sk_msg"


@pytest.mark.lab
def test_same_node_pair_is_in_the_sockhash_while_open_and_redirected(LA):
    assert socks(LA, "node1") == set()
    before = accel_counters(LA, "node1")
    held = Held(LA, "node1/pod-1", "198.18.1.2", 8080)   # pod-1 -> proxy -> pod-2, all on node1
    with held as client:
        # both legs, both ends: pod-1 <-> proxy (outbound) and proxy <-> pod-2 (inbound delivery)
        have = socks(LA, "node1")
        upstream = next(s for s in have if s.endswith("-> 198.18.1.2:8080"))
        proxy_side = upstream.split(" -> ")[0]
        assert proxy_side.startswith("198.18.0.11:")  # the proxy dials from the node's address
        assert have == {f"{client} -> 169.254.1.1:15001", f"169.254.1.1:15001 -> {client}",
                        upstream, f"198.18.1.2:8080 -> {proxy_side}"}
        mid = accel_counters(LA, "node1")
        held.second_request_and_close()
    after = accel_counters(LA, "node1")
    assert mid["accel_inserted"] - before["accel_inserted"] == 4
    # request pod-1 -> proxy -> pod-2 and response back: 4 messages at least, per request
    assert after["accel_redirected"] - mid["accel_redirected"] >= 4
    assert after["accel_redirected_bytes"] > mid["accel_redirected_bytes"]
    assert after["accel_insert_error"] == 0
    # closed sockets leave the map (the kernel unlinks them on close): nothing piles up
    wait_for(lambda: socks(LA, "node1") == set(), what="hm_socks to drain after close")
    assert capture_view(LA, "node1")["acceleration"]["pending_peers"] == 0


@pytest.mark.lab
def test_only_the_same_node_legs_of_a_remote_connection_are_accelerated(LA):
    held = Held(LA, "node1/pod-1", "198.18.2.1", 8080)   # pod-1 -> node1 proxy -> node2 proxy -> pod
    with held as client:
        assert socks(LA, "node1") == {f"{client} -> 169.254.1.1:15001", f"169.254.1.1:15001 -> {client}"}
        on2 = socks(LA, "node2")
        # node2: its proxy's dialed socket to the pod and the pod's accepted one; the socket
        # node2's proxy accepted from node1 (a different host) stays on TCP/IP
        assert len(on2) == 2 and all("198.18.2.1:8080" in s for s in on2), on2
        assert not any("198.18.0.11" in s for s in on2)
        held.second_request_and_close()
    wait_for(lambda: not socks(LA, "node1") and not socks(LA, "node2"), what="hm_socks to drain")


@pytest.mark.lab
def test_half_close_and_bulk_through_two_accelerated_legs(LA):
    """Same node end to end (pod-1 -> proxy -> pod-2), more bytes than the redirect budget:
    each socket hands its first ACCEL_BUDGET bytes to its peer, then continues over TCP/IP,
    and the streams stay byte-identical across that switch; the reply after EOF arrives
    (FIN travels over TCP behind the redirected bytes)."""
    from nodeagent.capture.ebpf import ACCEL_BUDGET
    ready = [f"{LA.names.run_dir}/accel-{p}.ready" for p in (7000, 7001)]
    target = LA.target("node1/pod-2")
    LA.spawn(target, [sys.executable, "-m", "meshlab.tcptools", "serve", "--port", "7000", "--ready-file", ready[0]],
             "accel-echo")
    LA.spawn(target, [sys.executable, "-m", "meshlab.tcptools", "serve", "--port", "7001", "--reply-after-eof",
                      "--ready-file", ready[1]], "accel-digest")
    wait_for(lambda: all(os.path.exists(f) for f in ready), what="tcp servers in node1/pod-2")
    before = accel_counters(LA, "node1")
    r = LA.run("node1/pod-1", [sys.executable, "-m", "meshlab.tcptools", "halfclose", "198.18.1.2:7001",
                               "--bytes", str(8 << 20)], timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout + r.stderr
    mid = accel_counters(LA, "node1")
    # the client's and the proxy's upstream socket each sent 8 MiB: both spent their budget
    assert mid["accel_budget_spent"] - before["accel_budget_spent"] >= 2
    assert 0 < mid["accel_redirected_bytes"] - before["accel_redirected_bytes"] <= 4 * ACCEL_BUDGET
    r = LA.run("node1/pod-1", [sys.executable, "-m", "meshlab.tcptools", "stream", "198.18.1.2:7000",
                               "--bytes", str(256 << 20)], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["received"] == 256 << 20 and out["sent_sha256"] == out["received_sha256"]
    after = accel_counters(LA, "node1")
    assert after["accel_budget_spent"] - mid["accel_budget_spent"] == 4  # every socket of both legs
    assert 0 < after["accel_redirected_bytes"] - mid["accel_redirected_bytes"] <= 4 * ACCEL_BUDGET
    assert after["accel_insert_error"] == 0
    wait_for(lambda: socks(LA, "node1") == set(), what="hm_socks to drain")


@pytest.mark.lab
def test_accelerated_restart_adopts_the_sockhash_and_sk_msg(LA):
    before = capture_view(LA, "node1")
    pin = f"{PIN_ROOT}/{LA.name}-node1/hm_socks"
    mp = m.Map.open_pinned(m.MAPS["hm_socks"], pin)
    socks_id = mp.id
    mp.close()
    kill_agent(LA, "node1", signal.SIGKILL)
    # the proxy's sockets died with it; the kernel unlinked them
    assert not any("15001 ->" in s for s in socks(LA, "node1"))
    start_agent(LA, "node1")
    after = capture_view(LA, "node1")
    assert after["programs_loaded"] == "adopted"
    for key in ("sockops_accel", "sk_msg"):
        assert after["programs"][key]["id"] == before["programs"][key]["id"]
    assert after["acceleration"]["sk_msg_attached"] == before["acceleration"]["sk_msg_attached"]
    assert after["attachments"] == before["attachments"]
    mp = m.Map.open_pinned(m.MAPS["hm_socks"], pin)
    assert mp.id == socks_id
    mp.close()
    n0 = accel_counters(LA, "node1")["accel_redirected"]
    r = curl(LA, "node1/pod-1", "http://198.18.1.2:8080/")
    assert r.returncode == 0 and json.loads(r.stdout)["pod"] == "pod-2"
    assert accel_counters(LA, "node1")["accel_redirected"] > n0


@pytest.mark.lab
def test_accelerated_uninstall_leaves_nothing_attached_or_pinned(LA):
    ids = {k: v["id"] for k, v in capture_view(LA, "node2")["programs"].items()}
    socks_pin = f"{PIN_ROOT}/{LA.name}-node2/hm_socks"
    mp = m.Map.open_pinned(m.MAPS["hm_socks"], socks_pin)
    socks_id = mp.id
    mp.close()
    kill_agent(LA, "node2", signal.SIGTERM)
    try:
        assert f"{LA.name}-node2" in _pins_of(LA)  # a stop keeps capture; uninstall removes it
        uninstall(LA, "node2")
        assert all(not progs for progs in bpftool_tree(LA, "node2").values())
        assert f"{LA.name}-node2" not in _pins_of(LA)
        progs = {p["id"] for p in json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                                            text=True, check=True).stdout)}
        assert not set(ids.values()) & progs  # sk_msg and sockops_accel included
        # unpinned, sk_msg detached, no program using it: the kernel frees the sockhash (its
        # release is deferred to a workqueue, hence the wait)
        wait_for(lambda: socks_id not in {mm["id"] for mm in json.loads(subprocess.run(
            ["bpftool", "-j", "map", "show"], capture_output=True, text=True, check=True).stdout)},
            what="the kernel to free hm_socks")
    finally:
        start_agent(LA, "node2")
    assert capture_view(LA, "node2")["acceleration"]["enabled"]


@pytest.mark.lab
def test_acceleration_switches_on_and_off_across_restarts(L):
    """The plain eBPF lab: restart node1's agent with capture.accelerate: true, then false."""
    top = str(labcg.cgroup_root() / L.names.cgroup_dir)
    cfg = mesh.agent_bootstrap(L, "node1", "ebpf")
    for on in (True, False):
        doc = yaml.safe_load(cfg.read_text())
        doc["capture"]["accelerate"] = on
        custom = cfg.with_name(f"agent-node1-accel-{on}.yaml")
        custom.write_text(yaml.safe_dump(doc, sort_keys=False))
        kill_agent(L, "node1", signal.SIGTERM if on else signal.SIGKILL)  # SIGKILL: the new agent must clean up
        start_agent(L, "node1", config=custom)
        tree = bpftool_tree(L, "node1")
        view = capture_view(L, "node1")
        assert view["last_verification"]["ok"], view["last_verification"]
        assert view["acceleration"]["enabled"] is on
        has_accel = {cg: "cgroup_sock_ops hm_sock_accel" in progs for cg, progs in tree.items()}
        assert has_accel == {f"{top}/node1/{c}": on for c in ("pod-1", "pod-2", "system")}, tree
        assert bool(view["acceleration"]["sk_msg_attached"]) is on
        n0 = accel_counters(L, "node1")["accel_redirected"]
        r = curl(L, "node1/pod-1", "http://198.18.1.2:8080/")
        assert r.returncode == 0 and json.loads(r.stdout)["pod"] == "pod-2"
        assert (accel_counters(L, "node1")["accel_redirected"] > n0) is on
    kill_agent(L, "node1", signal.SIGTERM)
    start_agent(L, "node1")  # the module's standard agent again


def test_accelerate_is_validated_in_bootstrap_and_spec():
    from nodeagent import bootstrap
    from nodeagent.errors import ConfigError
    base = {"node": "n1", "capture.mode": "ebpf", "capture.podCIDRs": ("198.18.1.0/24",),
            "capture.meshCIDRs": MESH, "snapshotFile": "/x.json"}
    assert bootstrap.build({**base, "capture.accelerate": True}, {}).capture_accelerate is True
    assert bootstrap.build(base, {}).capture_accelerate is bootstrap.Bootstrap(node="x").capture_accelerate
    with pytest.raises(ConfigError, match="capture.accelerate: only the eBPF backend accelerates"):
        bootstrap.build({**base, "capture.mode": "iptables", "capture.accelerate": True}, {})
    assert bootstrap.build({**base, "capture.mode": "auto", "capture.accelerate": True}, {}).capture_accelerate
    with pytest.raises(CaptureError, match="accelerate"):
        CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=MESH, accelerate="yes")
    assert CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=MESH, accelerate=True).to_dict()["accelerate"]


def test_accelerate_flag_overrides_the_file(tmp_path):
    from hostmesh.cli import build_parser
    from nodeagent import bootstrap
    f = tmp_path / "agent.yaml"
    f.write_text(yaml.safe_dump({"node": "n1", "snapshotFile": "/x.json", "capture": {
        "mode": "ebpf", "podCIDRs": ["198.18.1.0/24"], "meshCIDRs": list(MESH), "accelerate": True}}))
    values = bootstrap.load_file(str(f))
    for argv, want in (([], True), (["--no-accelerate"], False), (["--accelerate"], True)):
        args = build_parser().parse_args(["agent", "--config", str(f), *argv])
        assert bootstrap.build(values, bootstrap.flag_overrides(args)).capture_accelerate is want
    f.write_text(f.read_text().replace("accelerate: true", "accelerate: 1"))
    from nodeagent.errors import ConfigError
    with pytest.raises(ConfigError, match="capture.accelerate: must be true or false, got 1"):
        bootstrap.load_file(str(f))
