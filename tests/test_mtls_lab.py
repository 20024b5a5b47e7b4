"""Identity in the lab: the control plane serves 15010 over TLS from its CA, agents
authenticate with their node tokens and obtain certificates for their local identities
(/certs, `hostmesh proxy-config certs`, the expiry metric), and a node asking for an
identity that has no workload on it is denied, logged and counted — until one is
scheduled there."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshlab import mesh
from controlplane.ca import CertificateAuthority
from meshlab.lab import Lab
from tests.conftest import HOSTMESH, require_root, unique_lab_name, wait_for

pytestmark = pytest.mark.lab

TESTAPP = "spiffe://cluster.local/ns/default/sa/testapp"
INTRUDER = "spiffe://cluster.local/ns/default/sa/intruder"


@pytest.fixture(scope="module")
def mtls_lab():
    require_root("the mTLS lab tests")
    lab = Lab(unique_lab_name())
    try:
        lab.up(2, 1, capture="iptables")
        yield lab
    finally:
        lab.down()


def certs(lab, node):
    r = mesh.admin_get(lab, node, "/certs")
    assert r.returncode == 0, r.stdout + r.stderr
    return {c["identity"]: c for c in json.loads(r.stdout)}


SIGN = textwrap.dedent("""
    import asyncio, sys
    from nodeagent.identity.cpauth import ControlPlaneAuth, GrpcSigner, SignError
    from tests.test_ca import csr_for
    node, token, bundle, sa = sys.argv[1:5]
    async def main():
        signer = GrpcSigner("{cp}", ControlPlaneAuth.from_files(node, token, bundle))
        try:
            resp = await signer(csr_for()[0], "default", sa)
            print("ISSUED", resp.spiffe_id)
        except SignError as exc:
            print("REFUSED", exc.status.name, exc)
        finally:
            await signer.close()
    asyncio.run(main())
""").replace("{cp}", mesh.CP_GRPC)


def sign_from(lab, node: str, sa: str) -> str:
    r = lab.run(node, [sys.executable, "-c", SIGN, node, str(mesh.token_file(lab, node)),
                       str(mesh.root_bundle(lab)), sa], timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_agents_hold_certificates_for_their_local_identities(mtls_lab):
    lab = mtls_lab
    for node in ("node1", "node2"):
        wait_for(lambda: certs(lab, node).get(TESTAPP, {}).get("state") == "valid", what=f"{node}'s certificate")
        c = certs(lab, node)[TESTAPP]
        assert c["serial"] and c["not_after"] and c["next_renewal"]
        assert set(certs(lab, node)) == {TESTAPP}
        assert Path(c["cert_file"]).is_file()
        key = Path(c["cert_file"]).with_name("key.pem")
        assert key.stat().st_mode & 0o777 == 0o600
        assert mesh.admin_get(lab, node, "/ready").returncode == 0
    assert certs(lab, "node1")[TESTAPP]["serial"] != certs(lab, "node2")[TESTAPP]["serial"]  # a key per node
    metrics = mesh.admin_get(lab, "node1", "/stats/prometheus").stdout
    assert f'hostmesh_agent_certificate_expiry_seconds{{identity="{TESTAPP}"}}' in metrics
    r = subprocess.run([HOSTMESH, "proxy-config", "certs", "--lab", lab.name, "--node", "node1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "IDENTITY" in r.stdout and TESTAPP in r.stdout and "valid" in r.stdout


def test_controlplane_port_is_tls_with_the_lab_ca(mtls_lab):
    lab = mtls_lab
    # openssl from a node: the certificate verifies against the lab's root bundle for 198.18.0.2
    argv = lab.exec_argv(lab.target("node1"), [
        "openssl", "s_client", "-connect", mesh.CP_GRPC, "-CAfile", str(mesh.root_bundle(lab)),
        "-verify_ip", "198.18.0.2", "-verify_return_error", "-alpn", "h2", "-brief"])
    r = subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    text = (r.stdout + r.stderr).decode(errors="replace")  # the server's HTTP/2 preface is binary
    assert "Verification: OK" in text and "TLSv1.3" in text, text
    # a client trusting another root is refused at the handshake
    stranger = Path(lab.names.run_dir, "pki", "stranger")
    bundle = CertificateAuthority(stranger).trust_bundle_pem
    (stranger / "bundle.pem").write_text(bundle)
    argv = lab.exec_argv(lab.target("node1"), [
        "openssl", "s_client", "-connect", mesh.CP_GRPC, "-CAfile", str(stranger / "bundle.pem"),
        "-verify_return_error", "-brief"])
    r = subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and "verify error" in (r.stdout + r.stderr).decode(errors="replace")
    # a Sign call without the right token is refused
    other = Path(lab.names.run_dir, "pki", "wrong.token")
    other.write_text("w" * 40 + "\n")
    other.chmod(0o600)
    r = lab.run("node1", [sys.executable, "-c", SIGN, "node1", str(other), str(mesh.root_bundle(lab)), "testapp"],
                timeout=30)
    assert "REFUSED UNAUTHENTICATED" in r.stdout and "invalid bootstrap token for node 'node1'" in r.stdout, \
        r.stdout + r.stderr


def test_identity_without_a_workload_on_the_node_is_denied_until_scheduled(mtls_lab):
    lab = mtls_lab
    out = sign_from(lab, "node1", "intruder")
    assert out.startswith("REFUSED PERMISSION_DENIED"), out
    assert "no workload running as default/intruder is scheduled on node 'node1'" in out
    log = Path(lab.names.run_dir, "logs", "controlplane.log").read_text()
    assert "certificate request refused" in log and "intruder" in log and "node1" in log
    metrics = mesh.cp_get(lab, "/metrics").stdout
    assert 'hostmesh_controlplane_certificate_requests_total{result="denied"}' in metrics

    # schedule a workload running as default/intruder on node1: its agent gets the identity
    mesh.write_config(lab, "intruder.yaml", [{
        "apiVersion": "hostmesh.io/v1alpha1", "kind": "Workload",
        "metadata": {"name": "intruder", "namespace": "default"},
        "spec": {"node": "node1", "address": "198.18.1.200", "serviceAccount": "intruder"}}])
    try:
        wait_for(lambda: certs(lab, "node1").get(INTRUDER, {}).get("state") == "valid", timeout=30,
                 what="node1's certificate for default/intruder")
        assert INTRUDER not in certs(lab, "node2")  # node2 still has no such workload
        assert sign_from(lab, "node2", "intruder").startswith("REFUSED PERMISSION_DENIED")
    finally:
        (mesh.cp_config_dir(lab) / "intruder.yaml").unlink()
    # gone from the node: the agent drops the identity and its files
    wait_for(lambda: INTRUDER not in certs(lab, "node1"), timeout=30, what="default/intruder dropped")
    assert not Path(lab.names.run_dir, "certs", "node1", "cluster.local_default_intruder").exists()
