"""mTLS between node proxies in the lab, seen from outside: the fabric only ever carries
ciphertext between pods on different nodes, STRICT refuses plaintext from a lab host that
is not in the mesh, the destination proxy refuses client certificates that chain to the
mesh CA but are not acceptable workload leaves, and an identity whose certificate expired
while the CA was down gets its traffic refused, never downgraded.

A non-mesh host is an extra namespace on the fabric bridge (`hm-<lab>-ext`, 198.18.0.3,
a route to node2's pods only); `lab down` removes it with the rest of the prefix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from meshlab import mesh, naming
from meshlab.lab import Lab
from nodeagent.identity import spiffe_id
from nodeagent.proxy import tunnel_wire as wire
from nodeagent.proxy.tunnel_plan import TUNNEL_PORT
from tests.conftest import require_root, unique_lab_name, wait_for
from tests.tlsfixtures import TD, TestCA

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

EXT_IP = "198.18.0.3"
POD2 = naming.pod_ip(2, 1)  # node2/pod-1
TESTAPP = spiffe_id(TD, "default", "testapp")


# ------------------------------------------------------------------ helpers

def ext_ns(lab: Lab) -> str:
    return f"{lab.names.prefix}ext"


def add_external_host(lab: Lab) -> str:
    """A lab host outside the mesh (no agent, no certificate) that can reach node2's pods."""
    ns = ext_ns(lab)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    fabric = lab.names.fabric_ns
    for argv in (["ip", "-n", fabric, "link", "add", "x0", "type", "veth", "peer", "name", "eth0", "netns", ns],
                 ["ip", "-n", fabric, "link", "set", "x0", "master", "br0", "up"],
                 ["ip", "-n", ns, "link", "set", "lo", "up"],
                 ["ip", "-n", ns, "addr", "add", f"{EXT_IP}/24", "dev", "eth0"],
                 ["ip", "-n", ns, "link", "set", "eth0", "up"],
                 ["ip", "-n", ns, "route", "add", naming.pod_cidr(2), "via", naming.node_ip(2)]):
        subprocess.run(argv, check=True)
    return ns


def ext_run(lab: Lab, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ext_ns(lab), *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def curl_from(lab: Lab, where: str, url: str, *extra: str) -> subprocess.CompletedProcess:
    argv = ["curl", "-sS", "--max-time", "5", *extra, url]
    if where == "ext":
        return ext_run(lab, argv)
    return lab.run(where, argv, timeout=20)


def set_peer_authentication(lab: Lab, mode: str | None) -> None:
    path = mesh.cp_config_dir(lab) / "peerauthn.yaml"
    if mode is None:
        path.unlink(missing_ok=True)
        return
    mesh.write_config(lab, "peerauthn.yaml", [{
        "apiVersion": "hostmesh.io/v1alpha1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "default"}, "spec": {"mtls": {"mode": mode}}}])


class FabricCapture:
    """tcpdump on a host's fabric interface (eth0 of a node or of the external host),
    writing every TCP packet whole to a pcap file."""

    def __init__(self, ns: str, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "tcpdump", "-i", "eth0", "--immediate-mode", "-U", "-s", "0", "-n", "-Z", "root",
             "-w", str(path), "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # tcpdump says "listening" a moment before packets really land in the file: knock on
        # a closed port of the control plane's host until the file grows past its header
        deadline = time.monotonic() + 10
        while not (path.exists() and path.stat().st_size > 24):
            assert self.proc.poll() is None, self.proc.stderr.read().decode(errors="replace")
            assert time.monotonic() < deadline, "tcpdump captured nothing within 10 s"
            subprocess.run(["ip", "netns", "exec", ns, "bash", "-c",
                            f"echo > /dev/tcp/{naming.CONTROLPLANE_IP}/9"], capture_output=True, timeout=10)
            time.sleep(0.05)

    def stop(self) -> bytes:
        time.sleep(0.5)  # --immediate-mode -U: each packet is written as it arrives; let the last ones land
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=10)
        return self.path.read_bytes()

    def count(self, bpf_filter: str) -> int:
        r = subprocess.run(["tcpdump", "-r", str(self.path), "-n", bpf_filter], capture_output=True, text=True,
                           timeout=30)
        return len([line for line in r.stdout.splitlines() if line.strip()])


# A client of the tunnel as a foreign host would be: TLS to <pod>:15008 with the given
# certificate, one stream (OPEN + an HTTP request + EOF), then whatever comes back.
TUNNEL_CLIENT = textwrap.dedent("""
    import socket, ssl, sys
    sys.path.insert(0, sys.argv[6])
    from nodeagent.proxy import tunnel_wire as wire
    dst, cert, key, roots, src = sys.argv[1:6]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(roots)
    if cert != "-":
        ctx.load_cert_chain(cert, key)
    request = b"GET /?from=tunnel HTTP/1.1\\r\\nHost: pod\\r\\nConnection: close\\r\\n\\r\\n"
    try:
        with socket.create_connection((dst, 15008), timeout=10) as raw:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(wire.encode_open(dst, 8080, src) + wire.data_frames(request) + wire.EOF_FRAME)
                def exactly(n):
                    buf = b""
                    while len(buf) < n:
                        chunk = tls.recv(n - len(buf))
                        if not chunk:
                            raise ConnectionError("closed by the proxy")
                        buf += chunk
                    return buf
                got = b""
                while True:  # the server's frames until its EOF (the connection stays open)
                    head = int.from_bytes(exactly(4), "big")
                    ftype, length = head >> 24, head & 0xFFFFFF
                    payload = exactly(length) if length else b""
                    if ftype == wire.RESET:
                        raise ConnectionError(f"stream reset, code {payload.hex()}")
                    if ftype == wire.EOF:
                        break
                    got += payload
    except (OSError, ssl.SSLError) as exc:
        print("REFUSED", type(exc).__name__, exc)
        sys.exit(0)
    print("ANSWERED" if b"HTTP/1.1 200" in got else "REFUSED no answer", len(got))
""")


def tunnel_from_ext(lab: Lab, leaf, roots: Path) -> str:
    repo = str(Path(__file__).resolve().parent.parent)
    argv = [sys.executable, "-c", TUNNEL_CLIENT, POD2, str(leaf.chain) if leaf else "-",
            str(leaf.key) if leaf else "-", str(roots), EXT_IP, repo]
    r = ext_run(lab, argv)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def mtls_lab():
    require_root("the mTLS lab tests")
    lab = Lab(unique_lab_name())
    try:
        lab.up(2, 1, capture="iptables")
        add_external_host(lab)
        yield lab
    finally:
        lab.down()


# ------------------------------------------------------------------ tests

def test_cross_node_pod_traffic_is_ciphertext_on_the_fabric(mtls_lab, tmp_path):
    lab = mtls_lab
    marker = "hm-plaintext-marker-" + os.urandom(4).hex()
    cap = FabricCapture(lab.names.node_ns("node1"), tmp_path / "mesh.pcap")
    try:
        r = curl_from(lab, "node1/pod-1", f"http://{POD2}:8080/echo?{marker}", "--data-binary", marker)
        assert r.returncode == 0 and marker in r.stdout, r.stderr  # the app echoed it back
    finally:
        pcap = cap.stop()
    assert cap.count(f"tcp port {TUNNEL_PORT}") > 0, "the cross-node connection did not use the tunnel"
    assert cap.count("tcp port 8080") == 0, "plaintext 8080 traffic crossed the fabric"
    assert marker.encode() not in pcap

    # the same capture does see plaintext when there is some: a non-mesh host's request
    control = FabricCapture(ext_ns(lab), tmp_path / "plain.pcap")
    try:
        r = curl_from(lab, "ext", f"http://{POD2}:8080/echo?{marker}", "--data-binary", marker)
        assert r.returncode == 0, r.stderr
    finally:
        plain = control.stop()
    assert marker.encode() in plain

    metrics = mesh.admin_get(lab, "node2", "/stats/prometheus").stdout
    assert 'connection_security_policy="mutual_tls"' in metrics
    assert f'source_principal="{TESTAPP.uri}"' in metrics


def test_strict_refuses_plaintext_from_a_non_mesh_host_and_keeps_mesh_traffic(mtls_lab):
    lab = mtls_lab
    assert curl_from(lab, "ext", f"http://{POD2}:8080/").returncode == 0  # PERMISSIVE by default
    set_peer_authentication(lab, "STRICT")
    try:
        wait_for(lambda: curl_from(lab, "ext", f"http://{POD2}:8080/").returncode != 0, timeout=20,
                 what="STRICT to reach node2")
        r = curl_from(lab, "ext", f"http://{POD2}:8080/")
        assert r.returncode in (7, 52, 56), r  # refused / reset: never an answer
        mesh_answer = curl_from(lab, "node1/pod-1", f"http://{POD2}:8080/")
        assert mesh_answer.returncode == 0, mesh_answer.stderr
        assert json.loads(mesh_answer.stdout)["pod"] == "pod-1"
        metrics = mesh.admin_get(lab, "node2", "/stats/prometheus").stdout
        assert 'reason="mtls_required"' in metrics
    finally:
        set_peer_authentication(lab, None)
    wait_for(lambda: curl_from(lab, "ext", f"http://{POD2}:8080/").returncode == 0, timeout=20,
             what="PERMISSIVE again after removing the policy")


def test_destination_refuses_unacceptable_client_certificates(mtls_lab, tmp_path):
    lab = mtls_lab
    ca_dir = mesh.pki_dir(lab) / "ca"
    ca = TestCA.issuing_as(tmp_path / "leaves", ca_dir / "ca-cert.pem", ca_dir / "ca-key.pem")
    roots = mesh.root_bundle(lab)
    # a well-formed leaf from the mesh CA is accepted: the probe itself works
    assert tunnel_from_ext(lab, ca.leaf(TESTAPP), roots).startswith("ANSWERED")
    for name, leaf in ca.bad_leaves("default", "testapp").items():
        out = tunnel_from_ext(lab, leaf, roots)
        assert out.startswith("REFUSED"), f"{name}: {out}"
    foreign = TestCA(tmp_path / "foreign", name="another mesh")
    out = tunnel_from_ext(lab, foreign.leaf(uris=["spiffe://other.example/ns/default/sa/testapp"]), roots)
    assert out.startswith("REFUSED"), out
    assert tunnel_from_ext(lab, None, roots).startswith("REFUSED")  # no client certificate at all
    # openssl s_client, no client certificate, straight at the node's 15008
    r = ext_run(lab, ["sh", "-c", f"printf '' | openssl s_client -connect {POD2}:15008 -CAfile {roots} "
                                  f"-servername {wire.sni_for(TESTAPP)} -ign_eof 2>&1"])
    assert r.returncode != 0 or "certificate required" in r.stdout, r.stdout


@pytest.fixture(scope="module")
def short_ttl_lab():
    require_root("the certificate expiry lab test")
    lab = Lab(unique_lab_name())
    meshconfig = {"apiVersion": "hostmesh.io/v1alpha1", "kind": "MeshConfig",
                  "metadata": {"name": "default", "namespace": "default"},
                  "spec": {"certificateTTL": "60s"}}
    try:
        lab.up(2, 1, capture="iptables", config=[meshconfig])
        yield lab
    finally:
        lab.down()


def _certs(lab: Lab, node: str) -> dict:
    r = mesh.admin_get(lab, node, "/certs")
    return {c["identity"]: c for c in json.loads(r.stdout)} if r.returncode == 0 else {}


def test_ca_down_past_expiry_refuses_mesh_traffic_instead_of_downgrading(short_ttl_lab, tmp_path):
    lab = short_ttl_lab
    url = f"http://{POD2}:8080/"
    assert curl_from(lab, "node1/pod-1", url).returncode == 0
    for pid in mesh.controlplane_pids(lab):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not mesh.controlplane_running(lab), what="the control plane to stop")
    try:
        wait_for(lambda: _certs(lab, "node1").get(TESTAPP.uri, {}).get("state") == "expired", timeout=90,
                 what="node1's certificate to expire with the CA down")
        cap = FabricCapture(lab.names.node_ns("node1"), tmp_path / "expired.pcap")
        try:
            r = curl_from(lab, "node1/pod-1", url)
        finally:
            cap.stop()
        assert r.returncode != 0, "traffic of an identity with an expired certificate got through"
        assert cap.count("tcp port 8080") == 0, "the proxy fell back to plaintext"
        ready = mesh.admin_get(lab, "node1", "/ready")
        assert ready.returncode != 0 and "expired" in ready.stdout, ready.stdout
        metrics = mesh.admin_get(lab, "node1", "/stats/prometheus").stdout
        assert 'reason="no_client_certificate"' in metrics
    finally:
        mesh.start_controlplane(lab)
    # the CA is back: renewal succeeds (backoff is capped) and traffic flows again
    for node in ("node1", "node2"):  # both expired; each retries on its own capped backoff
        wait_for(lambda: _certs(lab, node).get(TESTAPP.uri, {}).get("state") == "valid", timeout=90,
                 what=f"{node}'s certificate to be renewed")
    wait_for(lambda: curl_from(lab, "node1/pod-1", url).returncode == 0, timeout=30, what="traffic to resume")
