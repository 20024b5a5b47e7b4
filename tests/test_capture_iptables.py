"""The iptables capture backend: pure rule building/parsing, then real capture in netns labs.

Root tests build tests/capture_lab.py (namespaces hm-capt-<pid>-*, deleted by the fixture
even on failure) and never touch the machine's own network namespace. Without root they
skip, except under CI=true where they fail: CI must really run them.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import shutil
import textwrap
import time

import pytest

from nodeagent.capture import CaptureSpec, CaptureStatus, make_capture, so_original_dst
from nodeagent.capture import netns as nsmod
from nodeagent.capture.iptables import (
    CHAIN_INBOUND, CHAIN_OUTBOUND, CHAIN_PREROUTING, JUMP, NOTHING, IptablesCapture, Owned,
    build_transition, compare, desired_state, drop_nat_table_if_empty, explain_failure,
    owned_state, parse_save,
)
from nodeagent.errors import CaptureError
from tests.capture_lab import NODE_IP, POD_IP, VIP, Acceptor

IN_CI = os.environ.get("CI") == "true"
pytestmark = pytest.mark.timeout(180)

MESH = ("198.19.0.0/16", "198.18.1.0/24", "198.18.2.0/24")


def spec_for(node: str, **kw) -> CaptureSpec:
    pods = {"node1": ("198.18.1.0/24",), "node2": ("198.18.2.0/24",)}[node]
    return CaptureSpec(pod_cidrs=pods, mesh_cidrs=MESH, **kw)


# ======================================================================================
# pure: no root, no namespaces
# ======================================================================================


def test_desired_rules_are_spelled_like_iptables_save():
    spec = CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=("198.19.0.0/16", "198.18.0.0/15"),
                       exclude_inbound_ports=(22, 9090))
    d = desired_state(spec).chain_map
    assert d[CHAIN_PREROUTING] == (
        "-m mark --mark 0x539 -j RETURN",
        "-s 198.18.1.0/24 -p tcp -j HOSTMESH-OUTBOUND",
        "-s 198.18.1.0/24 -j RETURN",
        "-d 198.18.1.0/24 -p tcp -j HOSTMESH-INBOUND",
    )
    assert d[CHAIN_OUTBOUND] == (
        "-d 198.19.0.0/16 -p tcp -j REDIRECT --to-ports 15001",
        "-d 198.18.0.0/15 -p tcp -j REDIRECT --to-ports 15001",
    )
    assert d[CHAIN_INBOUND] == (
        "-p tcp -m tcp --dport 22 -j RETURN",
        "-p tcp -m tcp --dport 9090 -j RETURN",
        "-p tcp -j REDIRECT --to-ports 15006",
    )
    assert desired_state(spec).jumps == (("PREROUTING", "-m comment --comment hostmesh -j HOSTMESH-PREROUTING"),)
    assert set(d) == {CHAIN_PREROUTING, CHAIN_OUTBOUND, CHAIN_INBOUND}  # no HOSTMESH-OUTPUT (see docstring)


def test_desired_rules_follow_spec_ports_mark_and_multiple_cidrs():
    spec = CaptureSpec(pod_cidrs=("198.18.1.0/24", "198.18.9.0/25"), mesh_cidrs=("0.0.0.0/0",),
                       outbound_port=16001, inbound_port=16006, socket_mark=0xBEEF)
    d = desired_state(spec).chain_map
    assert d[CHAIN_PREROUTING][0] == "-m mark --mark 0xbeef -j RETURN"
    # local pods: every outbound jump before any RETURN, every RETURN before any inbound jump
    assert d[CHAIN_PREROUTING][1:] == (
        "-s 198.18.1.0/24 -p tcp -j HOSTMESH-OUTBOUND", "-s 198.18.9.0/25 -p tcp -j HOSTMESH-OUTBOUND",
        "-s 198.18.1.0/24 -j RETURN", "-s 198.18.9.0/25 -j RETURN",
        "-d 198.18.1.0/24 -p tcp -j HOSTMESH-INBOUND", "-d 198.18.9.0/25 -p tcp -j HOSTMESH-INBOUND",
    )
    # iptables-save omits a 0.0.0.0/0 match, so the canonical rule does too
    assert d[CHAIN_OUTBOUND] == ("-p tcp -j REDIRECT --to-ports 16001",)
    assert d[CHAIN_INBOUND] == ("-p tcp -j REDIRECT --to-ports 16006",)


def test_transition_fresh_install_touches_only_our_chains():
    script = build_transition(NOTHING, desired_state(spec_for("node1")))
    lines = script.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    declared = [l for l in lines if l.startswith(":")]
    assert declared == [f":{c} - [0:0]" for c in (CHAIN_PREROUTING, CHAIN_OUTBOUND, CHAIN_INBOUND)]
    # builtin chains are never declared (that would set policies) nor flushed
    assert not any(l.startswith((":PREROUTING", ":OUTPUT", ":INPUT", ":POSTROUTING", "-F")) for l in lines)
    assert [l for l in lines if l.split()[:2] in (["-I", "PREROUTING"], ["-A", "PREROUTING"])] == [
        "-I PREROUTING 1 -m comment --comment hostmesh -j HOSTMESH-PREROUTING"]
    # the jump comes after the chain it targets is filled
    assert lines.index("-I PREROUTING 1 -m comment --comment hostmesh -j HOSTMESH-PREROUTING") > max(
        i for i, l in enumerate(lines) if l.startswith("-A "))


def test_transition_is_none_when_already_right_and_minimal_otherwise():
    want = desired_state(spec_for("node1"))
    assert build_transition(want, want) is None
    # one chain changed: only that chain is rewritten; the (single, correct) jump stays put
    chains = dict(want.chains)
    chains[CHAIN_OUTBOUND] = chains[CHAIN_OUTBOUND][:1]
    cur = Owned(chains=tuple(chains.items()), jumps=want.jumps)
    script = build_transition(cur, want)
    assert f":{CHAIN_OUTBOUND} - [0:0]" in script
    assert f":{CHAIN_INBOUND}" not in script and f":{CHAIN_PREROUTING}" not in script
    assert "PREROUTING 1" not in script and "-D " not in script


def test_transition_collapses_duplicate_jumps_and_deletes_stale_chains():
    want = desired_state(spec_for("node1"))
    stale_jump = ("OUTPUT", "-m comment --comment hostmesh -j HOSTMESH-OUTPUT")
    cur = Owned(chains=want.chains + (("HOSTMESH-OUTPUT", ("-m mark --mark 0x539 -j RETURN",)),),
                jumps=(JUMP, JUMP, JUMP, stale_jump))
    lines = build_transition(cur, want).splitlines()
    assert lines.count("-D PREROUTING -m comment --comment hostmesh -j HOSTMESH-PREROUTING") == 3
    assert "-D OUTPUT -m comment --comment hostmesh -j HOSTMESH-OUTPUT" in lines
    assert lines.count("-I PREROUTING 1 -m comment --comment hostmesh -j HOSTMESH-PREROUTING") == 1
    assert ":HOSTMESH-OUTPUT - [0:0]" in lines and "-X HOSTMESH-OUTPUT" in lines
    # delete after its jump is gone and after it has been flushed
    assert lines.index("-X HOSTMESH-OUTPUT") > lines.index("-D OUTPUT -m comment --comment hostmesh -j HOSTMESH-OUTPUT")


def test_transition_to_nothing_removes_jumps_flushes_and_deletes():
    want = desired_state(spec_for("node1"))
    lines = build_transition(want, NOTHING).splitlines()
    assert lines == ["*nat",
                     f":{CHAIN_PREROUTING} - [0:0]", f":{CHAIN_OUTBOUND} - [0:0]", f":{CHAIN_INBOUND} - [0:0]",
                     "-D PREROUTING -m comment --comment hostmesh -j HOSTMESH-PREROUTING",
                     f"-X {CHAIN_PREROUTING}", f"-X {CHAIN_OUTBOUND}", f"-X {CHAIN_INBOUND}", "COMMIT"]
    assert build_transition(NOTHING, NOTHING) is None


SAVE_SAMPLE = textwrap.dedent("""\
    # Generated by iptables-save v1.8.9 (nf_tables) on Mon Nov 23 09:24:29 2026
    *mangle
    :PREROUTING ACCEPT [10:600]
    -A PREROUTING -j MARK --set-xmark 0x1/0xffffffff
    COMMIT
    # Completed on Mon Nov 23 09:24:29 2026
    *nat
    :PREROUTING ACCEPT [3:160]
    :INPUT ACCEPT [0:0]
    :OUTPUT ACCEPT [0:0]
    :POSTROUTING ACCEPT [0:0]
    :FOREIGN - [0:0]
    :HOSTMESH-OUTBOUND - [0:0]
    :HOSTMESH-PREROUTING - [0:0]
    [7:420] -A PREROUTING -s 198.18.0.99/32 -m comment --comment "keep me, please" -j RETURN
    [1:60] -A PREROUTING -m comment --comment hostmesh -j HOSTMESH-PREROUTING
    -A PREROUTING -j FOREIGN
    -A OUTPUT -p tcp -j HOSTMESH-OUTBOUND
    -A FOREIGN -p udp -m udp --dport 53 -j RETURN
    [2:120] -A HOSTMESH-OUTBOUND -d 198.19.0.0/16 -p tcp -j REDIRECT --to-ports 15001
    -A HOSTMESH-PREROUTING -m mark --mark 0x539 -j RETURN
    COMMIT
    """)


def test_parse_save_tables_chains_rules_counters_and_quotes():
    tables = parse_save(SAVE_SAMPLE)
    assert set(tables) == {"mangle", "nat"}
    nat = tables["nat"]
    assert list(nat.chains) == ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "FOREIGN",
                                "HOSTMESH-OUTBOUND", "HOSTMESH-PREROUTING"]
    assert nat.chains["PREROUTING"] == "ACCEPT" and nat.chains["FOREIGN"] == "-"
    assert nat.rules["PREROUTING"] == [
        '-s 198.18.0.99/32 -m comment --comment "keep me, please" -j RETURN',
        "-m comment --comment hostmesh -j HOSTMESH-PREROUTING",
        "-j FOREIGN",
    ]
    assert nat.rules["INPUT"] == [] and nat.rules["HOSTMESH-OUTBOUND"] == [
        "-d 198.19.0.0/16 -p tcp -j REDIRECT --to-ports 15001"]
    assert parse_save("") == {}


def test_parse_save_rejects_garbage():
    with pytest.raises(CaptureError, match="outside a table"):
        parse_save("-A PREROUTING -j RETURN\n")
    with pytest.raises(CaptureError, match="not understood"):
        parse_save("*nat\n-Z PREROUTING\nCOMMIT\n")


def test_owned_state_picks_our_chains_and_references_only():
    owned = owned_state(parse_save(SAVE_SAMPLE)["nat"])
    assert dict(owned.chains) == {
        "HOSTMESH-OUTBOUND": ("-d 198.19.0.0/16 -p tcp -j REDIRECT --to-ports 15001",),
        "HOSTMESH-PREROUTING": ("-m mark --mark 0x539 -j RETURN",),
    }
    # our commented jump and a reference into our chains; not the foreign rules
    assert owned.jumps == (("PREROUTING", "-m comment --comment hostmesh -j HOSTMESH-PREROUTING"),
                           ("OUTPUT", "-p tcp -j HOSTMESH-OUTBOUND"))
    assert owned_state(None) == NOTHING


def test_compare_names_each_difference():
    want = desired_state(spec_for("node1"))
    have = owned_state(parse_save(SAVE_SAMPLE)["nat"])
    problems = "\n".join(compare(have, want))
    assert f"chain {CHAIN_INBOUND} is missing" in problems
    assert "rule missing: -A HOSTMESH-OUTBOUND -d 198.18.1.0/24" in problems
    assert "unexpected rule referring to hostmesh: -A OUTPUT -p tcp -j HOSTMESH-OUTBOUND" in problems
    dup = Owned(chains=want.chains, jumps=(JUMP, JUMP))
    assert compare(dup, want) == [f"jump rule present 2 times: -A {JUMP[0]} {JUMP[1]}"]
    assert compare(Owned(chains=want.chains), want) == [
        f"jump rule missing, capture is inactive: -A {JUMP[0]} {JUMP[1]}"]
    assert compare(want, want) == []


def test_explain_failure_names_what_is_missing():
    assert "REDIRECT target is unavailable" in explain_failure(
        "iptables-restore v1.8.9 (nf_tables): Couldn't load target `REDIRECT':No such file or directory")
    assert "nat table is unavailable" in explain_failure(
        "iptables-restore: can't initialize iptables table `nat': Table does not exist (do you need to insmod?)")
    assert "CAP_NET_ADMIN" in explain_failure(
        "iptables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)")


@pytest.mark.parametrize("kwargs, field", [
    ({"pod_cidrs": ("198.18.1.0/33",)}, "pod_cidrs"),
    ({"pod_cidrs": ("not-a-cidr",)}, "pod_cidrs"),
    ({"pod_cidrs": ("198.18.1.1/24",)}, "pod_cidrs"),          # host bits set
    ({"pod_cidrs": ()}, "pod_cidrs"),
    ({"pod_cidrs": "198.18.1.0/24"}, "pod_cidrs"),             # a bare string, not a list
    ({"pod_cidrs": ("0.0.0.0/0",)}, "pod_cidrs"),
    ({"pod_cidrs": ("fd00::/64",)}, "pod_cidrs"),
    ({"mesh_cidrs": ("198.19.0.0/16", "bogus")}, "mesh_cidrs"),
    ({"mesh_cidrs": ()}, "mesh_cidrs"),
    ({"mesh_cidrs": ("198.19.0.0/16", "198.19.0.0/16")}, "mesh_cidrs"),
    ({"outbound_port": 0}, "outbound_port"),
    ({"outbound_port": 70000}, "outbound_port"),
    ({"outbound_port": "15001"}, "outbound_port"),
    ({"inbound_port": -1}, "inbound_port"),
    ({"inbound_port": True}, "inbound_port"),
    ({"inbound_port": 15001}, "inbound_port"),                 # same as outbound
    ({"socket_mark": 0}, "socket_mark"),
    ({"socket_mark": 1 << 32}, "socket_mark"),
    ({"exclude_inbound_ports": (22, 0)}, "exclude_inbound_ports"),
    ({"exclude_inbound_ports": (22, 22)}, "exclude_inbound_ports"),
    ({"exclude_inbound_ports": 22}, "exclude_inbound_ports"),
])
def test_bad_spec_raises_capture_error_naming_the_field(kwargs, field):
    args = {"pod_cidrs": ("198.18.1.0/24",), "mesh_cidrs": MESH, **kwargs}
    with pytest.raises(CaptureError, match=field):
        CaptureSpec(**args)


def test_spec_is_normalised_to_tuples():
    spec = CaptureSpec(pod_cidrs=["198.18.1.0/24"], mesh_cidrs=[" 198.19.0.0/16"], exclude_inbound_ports=[22])
    assert spec.pod_cidrs == ("198.18.1.0/24",) and spec.mesh_cidrs == ("198.19.0.0/16",)
    assert spec.exclude_inbound_ports == (22,)
    hash(spec)
    assert json.loads(json.dumps(spec.to_dict()))["socket_mark"] == 0x539


def test_make_capture_unknown_mode_names_valid_modes():
    with pytest.raises(CaptureError, match="valid modes: iptables"):
        make_capture("tproxy", spec_for("node1"))
    cap = make_capture("iptables", spec_for("node1"))
    assert isinstance(cap, IptablesCapture) and cap.name == "iptables" and cap.netns is None


def test_original_destination_rejects_non_tcp_sockets():
    a, b = socket.socketpair()
    with a, b, pytest.raises(CaptureError, match="TCP/IP socket"):
        so_original_dst(a)


def test_missing_iptables_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no iptables anywhere
    cap = make_capture("iptables", spec_for("node1"))
    with pytest.raises(CaptureError, match=r"iptables-restore not found.*nothing was installed"):
        cap.install()
    status = cap.verify()
    assert isinstance(status, CaptureStatus)
    assert not status.ok and "iptables-save not found" in status.problems[0]
    assert json.dumps(cap.describe())  # still JSON-able, with the error in it


# ======================================================================================
# root: real capture inside a namespace lab
# ======================================================================================


def _require_root() -> None:
    missing = [t for t in ("ip", "iptables-save", "iptables-restore") if not shutil.which(t)]
    reason = None
    if os.geteuid() != 0:
        reason = "capture lab tests need root (network namespaces, iptables)"
    elif missing:
        reason = f"capture lab tests need {', '.join(missing)}"
    if reason:
        if IN_CI:
            pytest.fail(f"{reason}, and CI=true: CI must run them")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def lab():
    _require_root()
    from tests.capture_lab import CaptureLab

    the_lab = CaptureLab()
    try:
        the_lab.up()
        yield the_lab
    finally:
        the_lab.down()
    from tests.capture_lab import lab_namespaces
    assert not [n for n in lab_namespaces() if n.startswith(the_lab.prefix)]


@pytest.fixture
def L(lab):
    """The lab, with netfilter pristine in both nodes before and after every test."""
    for node in ("node1", "node2"):
        lab.reset_netfilter(node)
    baseline = {node: lab.network_state(node) for node in ("node1", "node2")}
    assert "HOSTMESH" not in baseline["node1"]["iptables-save"]
    lab.baseline = baseline
    try:
        yield lab
    finally:
        for node in ("node1", "node2"):
            lab.reset_netfilter(node)


def cap_on(L, node: str, **kw) -> IptablesCapture:
    return make_capture("iptables", spec_for(node, **kw), netns=L.ns(node))


def test_outbound_to_vip_lands_on_15001_with_original_destination(L):
    cap = cap_on(L, "node1")
    cap.install()
    assert cap.verify().ok, cap.verify().problems
    proxy = Acceptor(L.listen("node1", 15001))
    try:
        client = L.connect("pod1", VIP, 80)
        [conn] = proxy.wait(1)
        assert cap.original_destination(conn) == (VIP, 80)
        assert conn.getpeername()[0] == POD_IP["pod1"]
        client.sendall(b"ping")
        conn.settimeout(2)
        assert conn.recv(4) == b"ping"
    finally:
        proxy.close()


def test_pod_to_remote_pod_is_captured_outbound_on_its_node(L):
    cap = cap_on(L, "node1")
    cap.install()
    proxy = Acceptor(L.listen("node1", 15001))
    server = Acceptor(L.listen("pod2", 8080))
    try:
        L.connect("pod1", POD_IP["pod2"], 8080)
        [conn] = proxy.wait(1)
        assert cap.original_destination(conn) == (POD_IP["pod2"], 8080)
        time.sleep(0.2)
        assert server.conns == []  # the real destination never saw it
    finally:
        proxy.close()
        server.close()


def test_local_pod_to_local_pod_goes_outbound_not_inbound(L):
    cap = cap_on(L, "node1")
    cap.install()
    outbound = Acceptor(L.listen("node1", 15001))
    inbound = Acceptor(L.listen("node1", 15006))
    try:
        L.connect("pod1", POD_IP["pod3"], 7070)
        [conn] = outbound.wait(1)
        assert cap.original_destination(conn) == (POD_IP["pod3"], 7070)
        assert inbound.conns == []
    finally:
        outbound.close()
        inbound.close()


def test_traffic_arriving_from_another_node_lands_on_15006(L):
    cap = cap_on(L, "node2", exclude_inbound_ports=(22,))
    cap.install()
    inbound = Acceptor(L.listen("node2", 15006))
    server = Acceptor(L.listen("pod2", 8080))
    ssh = Acceptor(L.listen("pod2", 22))
    try:
        # a pod on node1 (node1 has no capture here): forwarded by node1, arrives on node2's eth0
        L.connect("pod1", POD_IP["pod2"], 8080)
        [conn] = inbound.wait(1)
        assert cap.original_destination(conn) == (POD_IP["pod2"], 8080)
        assert conn.getpeername()[0] == POD_IP["pod1"]  # REDIRECT keeps the source address
        # node1 itself (its OUTPUT path is never captured) -> still inbound on node2
        L.connect("node1", POD_IP["pod2"], 8080)
        conns = inbound.wait(2)
        assert len(conns) == 2 and conns[1].getpeername()[0] == NODE_IP["node1"]
        assert cap.original_destination(conns[1]) == (POD_IP["pod2"], 8080)
        # an excluded port goes straight to the pod
        L.connect("pod1", POD_IP["pod2"], 22)
        assert len(ssh.wait(1)) == 1
        assert len(inbound.conns) == 2 and server.conns == []
    finally:
        inbound.close()
        server.close()
        ssh.close()


def test_marked_proxy_sockets_are_not_captured(L):
    cap = cap_on(L, "node1")
    cap.install()
    status = cap.verify()
    assert status.ok, status.problems
    saved = L.iptables_save("node1", "nat")
    assert "-A HOSTMESH-PREROUTING -m mark --mark 0x539 -j RETURN" in saved
    # the mark-exclusion is the first rule of our entry chain
    ours = [l for l in saved.splitlines() if l.startswith("-A HOSTMESH-PREROUTING")]
    assert ours[0] == "-A HOSTMESH-PREROUTING -m mark --mark 0x539 -j RETURN"
    proxy = Acceptor(L.listen("node1", 15001))
    server = Acceptor(L.listen("pod1", 8080))
    try:
        # the proxy dialling a local pod with its mark: straight to the pod
        L.connect("node1", POD_IP["pod1"], 8080, mark=0x539)
        assert len(server.wait(1)) == 1
        time.sleep(0.2)
        assert proxy.conns == []
    finally:
        proxy.close()
        server.close()


def test_fail_closed_when_nothing_listens(L):
    vip_server = Acceptor(L.listen("node2", 80, addr=VIP))
    pod_server = Acceptor(L.listen("pod2", 8080))
    try:
        # control: without capture both destinations really are reachable from pod1
        L.connect("pod1", VIP, 80)
        L.connect("pod1", POD_IP["pod2"], 8080)
        assert len(vip_server.wait(1)) == 1 and len(pod_server.wait(1)) == 1
        cap_on(L, "node1").install()
        # capture on, proxy dead: refused by node1's own stack, never forwarded in plaintext
        for dst in ((VIP, 80), (POD_IP["pod2"], 8080)):
            with pytest.raises(ConnectionRefusedError):
                L.connect("pod1", *dst)
        time.sleep(0.3)
        assert len(vip_server.conns) == 1 and len(pod_server.conns) == 1
    finally:
        vip_server.close()
        pod_server.close()


def test_redirect_drops_on_an_addressless_pod_veth_and_verify_says_so(lab):
    """REDIRECT needs an IPv4 address on the incoming interface (see iptables.py docstring).

    A second lab whose node-side pod veths carry no address, as point-to-point CNIs (and
    meshlab today) build them. (Deleting the address in the shared lab would not do: removing
    an interface's last IPv4 address also flushes every IPv4 route through it.)
    """
    from tests.capture_lab import CaptureLab

    with CaptureLab(tag="noaddr", node_veth_address=None) as bare:
        proxy = Acceptor(bare.listen("node1", 15001))
        vip_server = Acceptor(bare.listen("node2", 80, addr=VIP))
        # control: the topology itself works without capture
        bare.connect("pod1", VIP, 80)
        assert len(vip_server.wait(1)) == 1
        cap = make_capture("iptables", spec_for("node1"), netns=bare.ns("node1"))
        cap.install()
        status = cap.verify()
        assert not status.ok
        assert {p.split()[1] for p in status.problems} == {"vpod1", "vpod3"}, status.problems
        assert all("no IPv4 address" in p for p in status.problems)
        with pytest.raises((TimeoutError, socket.timeout)):
            bare.connect("pod1", VIP, 80, timeout=1.5)   # dropped: fail-closed, but not captured
        assert proxy.conns == [] and len(vip_server.conns) == 1
        proxy.close()
        vip_server.close()
    # the shared lab (with addresses) has no such problem
    cap = make_capture("iptables", spec_for("node1"), netns=lab.ns("node1"))
    assert not cap._interface_problems()


def test_install_is_idempotent_across_reinstalls_and_crashes(L):
    cap_on(L, "node1").install()
    clean = L.iptables_save("node1", "nat")
    assert clean.count("--comment hostmesh") == 1
    cap = cap_on(L, "node1")
    cap.install()
    cap.install()
    assert L.iptables_save("node1", "nat") == clean
    for _ in range(20):
        cap_on(L, "node1").install()          # a new agent after a crash, then its reconcile
        cap = cap_on(L, "node1")
        cap.install()
        assert L.iptables_save("node1", "nat") == clean
    assert cap.verify().ok


def test_install_adopts_crash_leftovers(L):
    cap_on(L, "node1").install()
    clean = L.iptables_save("node1", "nat")
    L.reset_netfilter("node1")
    # what a crashed, older agent could have left: stale chain + jump, two copies of the
    # entry jump, a half-written chain
    L.sh("node1", "iptables-restore", "--noflush", input=textwrap.dedent("""\
        *nat
        :HOSTMESH-OUTPUT - [0:0]
        :HOSTMESH-PREROUTING - [0:0]
        :HOSTMESH-OUTBOUND - [0:0]
        -A HOSTMESH-OUTPUT -m mark --mark 0x539 -j RETURN
        -A HOSTMESH-OUTBOUND -d 198.19.0.0/16 -p tcp -j REDIRECT --to-ports 15001
        -A PREROUTING -m comment --comment hostmesh -j HOSTMESH-PREROUTING
        -A PREROUTING -m comment --comment hostmesh -j HOSTMESH-PREROUTING
        -A OUTPUT -m comment --comment hostmesh -j HOSTMESH-OUTPUT
        COMMIT
        """))
    cap = cap_on(L, "node1")
    assert not cap.verify().ok
    cap.install()
    assert L.iptables_save("node1", "nat") == clean
    assert cap.verify().ok


def test_remove_leaves_no_trace(L):
    before = L.network_state("node1")
    cap = cap_on(L, "node1")
    cap.remove()                                   # nothing installed: a no-op ...
    assert L.network_state("node1") == before      # ... that does not even create the nat table
    cap.install()
    assert L.network_state("node1") != before
    cap.remove()
    assert L.network_state("node1") == before
    cap.remove()
    assert L.network_state("node1") == before
    # a new object (the agent restarted) removes what an earlier one installed
    cap_on(L, "node1").install()
    cap_on(L, "node1").remove()
    assert L.network_state("node1") == before


FOREIGN = textwrap.dedent("""\
    *nat
    :FOREIGN-NAT - [0:0]
    -A PREROUTING -s 198.18.0.99/32 -m comment --comment "not ours" -j RETURN
    -A PREROUTING -p tcp -m tcp --dport 9999 -j FOREIGN-NAT
    -A FOREIGN-NAT -p tcp -j REDIRECT --to-ports 9998
    -A FOREIGN-NAT -j RETURN
    -A OUTPUT -d 198.18.0.98/32 -j RETURN
    -A POSTROUTING -s 198.18.1.0/24 -d 198.18.9.0/24 -j MASQUERADE
    COMMIT
    *filter
    :FOREIGN-FILTER - [0:0]
    -A INPUT -p tcp -m tcp --dport 9 -j DROP
    -A FOREIGN-FILTER -j ACCEPT
    COMMIT
    *mangle
    -A PREROUTING -j MARK --set-xmark 0x7/0xff
    COMMIT
    """)


def test_foreign_rules_survive_install_and_remove_in_order(L):
    L.sh("node1", "iptables-restore", "--noflush", input=FOREIGN)
    before = L.network_state("node1")
    foreign_lines = [l for l in before["iptables-save"].splitlines() if l.startswith(("-A", ":"))]
    cap = cap_on(L, "node1")
    cap.install()
    during = L.iptables_save("node1")
    kept = [l for l in during.splitlines() if l.startswith(("-A", ":")) and "HOSTMESH" not in l]
    assert kept == foreign_lines
    # our jump went to the top of PREROUTING, ahead of every foreign rule
    nat = during.split("*nat\n", 1)[1].split("COMMIT", 1)[0]
    prerouting = [l for l in nat.splitlines() if l.startswith("-A PREROUTING")]
    assert prerouting[0] == "-A PREROUTING -m comment --comment hostmesh -j HOSTMESH-PREROUTING"
    cap.install()
    cap_on(L, "node1").install()
    assert L.iptables_save("node1") == during
    cap.remove()
    assert L.network_state("node1") == before


def test_verify_reports_hand_deleted_rules_and_install_repairs(L):
    cap = cap_on(L, "node1")
    cap.install()
    clean = L.iptables_save("node1", "nat")
    L.sh("node1", "iptables", "-t", "nat", "-D", CHAIN_OUTBOUND, "1")
    status = cap.verify()
    assert not status.ok
    assert any(CHAIN_OUTBOUND in p and "rule missing" in p and "198.19.0.0/16" in p for p in status.problems)
    cap.install()
    assert cap.verify().ok and L.iptables_save("node1", "nat") == clean
    # the entry jump deleted by hand: capture is off, verify says so, install puts it back
    L.sh("node1", "iptables", "-t", "nat", "-D", *JUMP[0].split(), *JUMP[1].split())
    status = cap.verify()
    assert not status.ok and any("jump rule missing" in p for p in status.problems)
    cap.install()
    assert cap.verify().ok and L.iptables_save("node1", "nat") == clean
    # an extra rule slipped into one of our chains is reported and dropped
    L.sh("node1", "iptables", "-t", "nat", "-A", CHAIN_INBOUND, "-p", "tcp", "-j", "RETURN")
    assert any("unexpected rule" in p for p in cap.verify().problems)
    cap.install()
    assert L.iptables_save("node1", "nat") == clean


def test_describe_is_json_and_reports_installed_rules(L):
    cap = cap_on(L, "node1")
    d0 = json.loads(json.dumps(cap.describe()))
    assert d0["backend"] == "iptables" and d0["installed"] == {"chains": {}, "jumps": []}
    assert d0["last_verification"] is None
    cap.install()
    cap.verify()
    d = json.loads(json.dumps(cap.describe()))
    assert d["spec"]["pod_cidrs"] == ["198.18.1.0/24"] and d["netns"] == L.ns("node1")
    assert "nf_tables" in d["iptables"] or "legacy" in d["iptables"]
    assert d["installed"]["chains"] == d["desired"]["chains"]
    assert d["installed"]["jumps"] == ["-A PREROUTING -m comment --comment hostmesh -j HOSTMESH-PREROUTING"]
    assert d["last_verification"]["ok"] is True


def test_netns_none_means_the_calling_namespace(L):
    spec = spec_for("node1")

    def in_node1():
        cap = make_capture("iptables", spec)   # netns=None: wherever this thread is
        cap.install()
        return cap.verify()

    status = nsmod.call_in(L.ns("node1"), in_node1)
    assert status.ok, status.problems
    assert make_capture("iptables", spec, netns=L.ns("node1")).verify().ok
    assert "HOSTMESH" not in L.iptables_save("node2")
    nsmod.call_in(L.ns("node1"), lambda: make_capture("iptables", spec).remove())
    assert L.network_state("node1") == L.baseline["node1"]


def test_empty_nat_table_is_only_dropped_when_really_empty(L):
    L.sh("node1", "iptables", "-t", "nat", "-A", "POSTROUTING", "-d", "198.18.9.9/32", "-j", "RETURN")
    assert nsmod.call_in(L.ns("node1"), drop_nat_table_if_empty) is False   # kernel said EBUSY
    assert "-A POSTROUTING -d 198.18.9.9/32 -j RETURN" in L.iptables_save("node1", "nat")
    L.sh("node1", "iptables", "-t", "nat", "-F", "POSTROUTING")
    assert nsmod.call_in(L.ns("node1"), drop_nat_table_if_empty) is True
    assert L.iptables_save("node1") == L.baseline["node1"]["iptables-save"]


# loses our inbound rules on its first run only (so the rollback that follows works)
LOSE_INBOUND_ONCE = ("if [ -e ONCE ]; then exec REAL \"$@\"; fi\n"
                     "touch ONCE\nsed '/^-A HOSTMESH-INBOUND/d' | REAL \"$@\"\n")


def _shim(tmp_path, script: str) -> str:
    """A PATH directory whose iptables-restore is `script`; iptables-save is the real one."""
    d = tmp_path / "shim"
    d.mkdir(parents=True)
    real_restore = shutil.which("iptables-restore")
    (d / "iptables-restore").write_text("#!/bin/sh\n" + script.replace("REAL", real_restore)
                                        .replace("ONCE", str(d / "used")))
    (d / "iptables-restore").chmod(stat.S_IRWXU)
    os.symlink(shutil.which("iptables-save"), d / "iptables-save")
    return f"{d}:{os.environ['PATH']}"


@pytest.mark.parametrize("stderr, expect", [
    ("iptables-restore v1.8.9 (nf_tables): Couldn't load target `REDIRECT':No such file or directory",
     "REDIRECT target is unavailable"),
    ("iptables-restore v1.8.9 (legacy): iptables-restore: unable to initialize table 'nat'\n"
     "can't initialize iptables table `nat': Table does not exist (do you need to insmod?)",
     "nat table is unavailable"),
])
def test_unavailable_kernel_features_fail_cleanly(L, tmp_path, monkeypatch, stderr, expect):
    (tmp_path / "stderr.txt").write_text(stderr + "\n")
    monkeypatch.setenv("PATH", _shim(tmp_path, f"cat >/dev/null; cat {tmp_path / 'stderr.txt'} >&2; exit 2\n"))
    cap = cap_on(L, "node1")
    with pytest.raises(CaptureError, match=expect):
        cap.install()
    assert L.network_state("node1") == L.baseline["node1"]


def test_install_rolls_back_when_rules_do_not_read_back(L, tmp_path, monkeypatch):
    # an iptables-restore that silently loses part of the ruleset (half-applied install)
    monkeypatch.setenv("PATH", _shim(tmp_path, LOSE_INBOUND_ONCE))
    cap = cap_on(L, "node1")
    with pytest.raises(CaptureError, match="rolled back.*HOSTMESH-INBOUND"):
        cap.install()
    assert L.network_state("node1") == L.baseline["node1"]
    # with capture already in place, a failed upgrade returns to the previous rules, not to nothing
    monkeypatch.undo()
    cap_on(L, "node1").install()
    previous = L.iptables_save("node1", "nat")
    monkeypatch.setenv("PATH", _shim(tmp_path / "again", LOSE_INBOUND_ONCE))
    with pytest.raises(CaptureError, match="rolled back"):
        cap_on(L, "node1", exclude_inbound_ports=(22,)).install()
    assert L.iptables_save("node1", "nat") == previous


def test_remove_other_backends_removes_only_leftovers_of_the_others(monkeypatch):
    """A changed capture.mode: once the new backend is installed, the old one's leftovers go;
    a backend with nothing installed is not touched, and one that cannot even be checked is
    logged, not raised."""
    import nodeagent.capture as capture_pkg
    from nodeagent.capture.base import Capture
    from nodeagent.errors import CaptureError

    calls = []

    def fake(name, leftovers, broken=False):
        class Fake(Capture):
            def __init__(self, spec, netns=None):
                if broken:
                    raise CaptureError(f"{name}: not on this host")
                super().__init__(spec, netns=netns)
                self.name = name

            def leftovers(self):
                return leftovers

            def remove(self):
                calls.append(name)

            def install(self):  # pragma: no cover
                pass

            def verify(self):  # pragma: no cover
                return CaptureStatus(ok=True)

            def describe(self):  # pragma: no cover
                return {}
        return Fake

    spec = CaptureSpec(pod_cidrs=("198.18.1.0/24",), mesh_cidrs=("198.18.0.0/15",))
    monkeypatch.setattr(capture_pkg, "BACKENDS", {"iptables": fake("iptables", True), "ebpf": fake("ebpf", True),
                                                  "auto": fake("auto", True)})
    active = capture_pkg.BACKENDS["ebpf"](spec)
    assert capture_pkg.remove_other_backends(active) == ["iptables"] and calls == ["iptables"]
    calls.clear()
    monkeypatch.setattr(capture_pkg, "BACKENDS", {"iptables": fake("iptables", False),
                                                  "ebpf": fake("ebpf", True, broken=True)})
    assert capture_pkg.remove_other_backends(capture_pkg.BACKENDS["iptables"](spec)) == []
    assert capture_pkg.remove_other_backends(fake("ebpf", False)(spec)) == [] and calls == []
