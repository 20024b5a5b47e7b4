"""The control plane's secured gRPC port on loopback: TLS from its CA, node tokens on every
call, the node authorizer on Sign, and the agent's clients (GrpcSigner, ControlPlaneClient)
against it. No root, ephemeral ports, every wait has a deadline."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509

from controlplane import ca
from controlplane.api import NODE_METADATA, SIGN_METHOD, STREAM_METHOD, TOKEN_METADATA
from controlplane.api import certificates_pb2 as cpb
from controlplane.api import discovery_pb2 as pb
from controlplane.auth import NodeTokens, TokenFileError, Unauthenticated
from controlplane.process import ControlPlane, Security
from nodeagent.cpclient import ControlPlaneClient
from nodeagent.errors import ConfigError
from nodeagent.identity import leaf_identity, spiffe_id
from nodeagent.identity.cpauth import ControlPlaneAuth, GrpcSigner, SignError
from nodeagent.identity.manager import CertificateManager
from nodeagent.state import AgentState
from prometheus_client import CollectorRegistry
from tests.test_ca import csr_for

pytestmark = pytest.mark.timeout(90)


def workload(name: str, node: str, address: str, sa: str, namespace: str = "default") -> dict:
    return {"apiVersion": "hostmesh.io/v1alpha1", "kind": "Workload",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"node": node, "address": address, "serviceAccount": sa}}


def write_token(d: Path, node: str, token: str | None = None) -> str:
    token = token or ca.new_token()
    path = d / f"{node}.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.config = tmp_path / "config"
        self.config.mkdir()
        self.write_workloads([workload("web-1", "node1", "198.18.1.1", "web"),
                              workload("db-1", "node2", "198.18.2.1", "db")])
        self.tokens = tmp_path / "tokens"
        self.tokens.mkdir()
        self.token = {n: write_token(self.tokens, n) for n in ("node1", "node2")}
        self.cp = ControlPlane(str(self.config), grpc_address="127.0.0.1:0", http_host="127.0.0.1", http_port=0,
                               security=Security(ca_dir=str(tmp_path / "ca"), tokens_dir=str(self.tokens),
                                                 tls_names=("127.0.0.1", "localhost")))
        self.bundle = tmp_path / "root-bundle.pem"
        self.bundle.write_text(self.cp.ca.trust_bundle_pem)
        self.task: asyncio.Task | None = None

    def write_workloads(self, docs: list[dict]) -> None:
        tmp = self.config / ".w.tmp"
        tmp.write_text(yaml.safe_dump_all(docs))
        tmp.replace(self.config / "workloads.yaml")

    async def start(self) -> Env:
        self.task = asyncio.create_task(self.cp.run())
        await wait_until(lambda: self.cp.grpc.port and self.cp.identities is not None, "control plane up")
        return self

    async def stop(self) -> None:
        self.cp._stop.set()
        await self.task

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.cp.grpc.port}"

    def auth(self, node: str = "node1", bundle: Path | None = None, token: str | None = None) -> ControlPlaneAuth:
        tf = self.tmp / f"agent-{node}.token"
        write_token(tf.parent, f"agent-{node}", token or self.token[node])
        return ControlPlaneAuth.from_files(node, str(tf), str(bundle or self.bundle))

    def sample(self, name: str, labels: dict) -> float:
        return self.cp.registry.get_sample_value(name, labels) or 0.0


async def wait_until(pred, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def run(scenario):
    async def main():
        return await asyncio.wait_for(scenario(), 80)
    asyncio.run(main())


# ------------------------------------------------------------------ tokens (no network)
def test_token_checks(tmp_path):
    write_token(tmp_path, "node1", "a" * 32)
    tokens = NodeTokens(tmp_path)
    assert tokens.authenticate([(NODE_METADATA, "node1"), (TOKEN_METADATA, "Bearer " + "a" * 32)]) == "node1"
    for md, message in [
        ([], "missing x-hostmesh-node"),
        ([(NODE_METADATA, "node1")], "node 'node1' sent no bootstrap token"),
        ([(NODE_METADATA, "node1"), (TOKEN_METADATA, "a" * 32)], "must be 'Bearer <token>'"),
        ([(NODE_METADATA, "node1"), (TOKEN_METADATA, "Bearer " + "b" * 32)], "invalid bootstrap token for node 'node1'"),
        ([(NODE_METADATA, "node9"), (TOKEN_METADATA, "Bearer " + "a" * 32)], "invalid bootstrap token for node 'node9'"),
    ]:
        with pytest.raises(Unauthenticated, match=message):
            tokens.authenticate(md)
    os.chmod(tmp_path / "node1.token", 0o644)
    with pytest.raises(TokenFileError, match=r"readable by group or others \(mode 0644\)"):
        tokens.reload_if_changed()
    # the tokens loaded before stay in force
    assert tokens.authenticate([(NODE_METADATA, "node1"), (TOKEN_METADATA, "Bearer " + "a" * 32)]) == "node1"
    (tmp_path / "short.token").write_text("abc")
    os.chmod(tmp_path / "short.token", 0o600)
    os.chmod(tmp_path / "node1.token", 0o600)
    with pytest.raises(TokenFileError, match="short.token: a token must be 16-4096 characters"):
        NodeTokens(tmp_path)


def test_agent_credentials_are_checked_at_start(tmp_path):
    bundle = tmp_path / "b.pem"
    bundle.write_text(ca.CertificateAuthority(tmp_path / "ca").trust_bundle_pem)
    tok = tmp_path / "t"
    tok.write_text("x" * 32)
    os.chmod(tok, 0o640)
    with pytest.raises(ConfigError, match="controlPlaneAuth.tokenFile: .*readable by group or others"):
        ControlPlaneAuth.from_files("n1", str(tok), str(bundle))
    os.chmod(tok, 0o600)
    with pytest.raises(ConfigError, match="controlPlaneAuth.rootBundle: .*cannot read"):
        ControlPlaneAuth.from_files("n1", str(tok), str(tmp_path / "missing.pem"))
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(ConfigError, match="controlPlaneAuth.rootBundle: .*not PEM certificates"):
        ControlPlaneAuth.from_files("n1", str(tok), str(tmp_path / "bad.pem"))
    assert ControlPlaneAuth.from_files("n1", str(tok), str(bundle)).metadata() == (
        (TOKEN_METADATA, "Bearer " + "x" * 32), (NODE_METADATA, "n1"))


# ------------------------------------------------------------------ Sign over TLS
def test_sign_issues_for_a_local_identity(tmp_path):
    async def scenario():
        env = await Env(tmp_path).start()
        signer = GrpcSigner(env.address, env.auth())
        try:
            pem_csr, _key = csr_for(uri="spiffe://cluster.local/ns/kube-system/sa/admin")
            resp = await signer(pem_csr, "default", "web")
            leaf = x509.load_pem_x509_certificates(resp.cert_chain_pem.encode())[0]
            assert leaf_identity(leaf, "cluster.local") == spiffe_id("cluster.local", "default", "web")
            assert resp.spiffe_id == "spiffe://cluster.local/ns/default/sa/web"
            assert resp.not_after - resp.not_before == pytest.approx(86400 + ca.BACKDATE, abs=2)
            assert resp.serial == f"{leaf.serial_number:x}"
            assert env.sample("hostmesh_controlplane_certificate_requests_total", {"result": "issued"}) == 1
        finally:
            await signer.close()
            await env.stop()
    run(scenario)


async def raw_sign(env: Env, metadata, namespace="default", sa="web", csr=None):
    creds = grpc.ssl_channel_credentials(root_certificates=env.bundle.read_bytes())
    async with grpc.aio.secure_channel(env.address, creds) as ch:
        call = ch.unary_unary(SIGN_METHOD, request_serializer=cpb.SignRequest.SerializeToString,
                              response_deserializer=cpb.SignResponse.FromString)
        return await call(cpb.SignRequest(csr_pem=csr or csr_for()[0], namespace=namespace, service_account=sa),
                          metadata=metadata, timeout=10)


def test_missing_or_wrong_token_is_unauthenticated(tmp_path):
    async def scenario():
        env = await Env(tmp_path).start()
        try:
            for md, message in [
                ((), "missing x-hostmesh-node metadata"),
                (((NODE_METADATA, "node1"),), "node 'node1' sent no bootstrap token"),
                (((NODE_METADATA, "node1"), (TOKEN_METADATA, "Bearer " + env.token["node2"])),
                 "invalid bootstrap token for node 'node1'"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await raw_sign(env, md)
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert message in exc.value.details()
            assert env.sample("hostmesh_controlplane_certificate_requests_total", {"result": "unauthenticated"}) == 3
            # the discovery stream needs the token too
            creds = grpc.ssl_channel_credentials(root_certificates=env.bundle.read_bytes())
            async with grpc.aio.secure_channel(env.address, creds) as ch:
                call = ch.stream_stream(STREAM_METHOD, request_serializer=pb.AgentMessage.SerializeToString,
                                        response_deserializer=pb.SnapshotUpdate.FromString)()
                # the server may refuse the stream before the first write completes: either call raises
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await call.write(pb.AgentMessage(hello=pb.Hello(node="node1")))
                    await call.read()
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert env.sample("hostmesh_controlplane_authentication_failures_total", {"rpc": "discovery"}) == 1
        finally:
            await env.stop()
    run(scenario)


def test_a_node_streams_only_its_own_snapshot(tmp_path):
    async def scenario():
        env = await Env(tmp_path).start()
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=env.bundle.read_bytes())
            async with grpc.aio.secure_channel(env.address, creds) as ch:
                call = ch.stream_stream(STREAM_METHOD, request_serializer=pb.AgentMessage.SerializeToString,
                                        response_deserializer=pb.SnapshotUpdate.FromString)(
                    metadata=((NODE_METADATA, "node1"), (TOKEN_METADATA, "Bearer " + env.token["node1"])))
                await call.write(pb.AgentMessage(hello=pb.Hello(node="node2")))
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await call.read()
                assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "node 'node1' may only stream its own snapshot, the Hello names 'node2'" in exc.value.details()
        finally:
            await env.stop()
    run(scenario)


def test_node_authorizer_denies_then_allows_once_scheduled(tmp_path, caplog):
    async def scenario():
        env = await Env(tmp_path).start()
        signer = GrpcSigner(env.address, env.auth("node1"))
        try:
            with caplog.at_level(logging.WARNING, logger="hostmesh.controlplane.certificates"):
                with pytest.raises(SignError) as exc:
                    await signer(csr_for()[0], "default", "db")  # db runs on node2 only
            assert exc.value.status == grpc.StatusCode.PERMISSION_DENIED
            assert ("node 'node1' may not obtain spiffe://cluster.local/ns/default/sa/db: no workload running as "
                    "default/db is scheduled on node 'node1'") in str(exc.value)
            rec = [r for r in caplog.records if r.message == "certificate request refused"][-1]
            assert (rec.node, rec.identity, rec.result) == ("node1", "default/db", "denied")
            assert "no workload running as default/db" in rec.reason
            assert env.sample("hostmesh_controlplane_certificate_requests_total", {"result": "denied"}) == 1

            env.write_workloads([workload("web-1", "node1", "198.18.1.1", "web"),
                                 workload("db-1", "node2", "198.18.2.1", "db"),
                                 workload("db-2", "node1", "198.18.1.2", "db")])
            await wait_until(lambda: ("default", "db") in env.cp.identities.by_node.get("node1", ()), "db on node1")
            resp = await signer(csr_for()[0], "default", "db")
            assert resp.spiffe_id.endswith("/ns/default/sa/db")

            # invalid requests are INVALID_ARGUMENT with the reason
            for ns, sa, csr, message in [("Bad_NS", "web", None, "namespace 'Bad_NS'"),
                                         ("default", "web", "garbage", "not a PEM certificate request")]:
                with pytest.raises(SignError) as exc:
                    await signer(csr or csr_for()[0], ns, sa)
                assert exc.value.status == grpc.StatusCode.INVALID_ARGUMENT and message in str(exc.value)
            assert env.sample("hostmesh_controlplane_certificate_requests_total", {"result": "invalid"}) == 2
        finally:
            await signer.close()
            await env.stop()
    run(scenario)


def test_tls_on_the_grpc_port(tmp_path):
    async def scenario():
        env = await Env(tmp_path).start()
        other = tmp_path / "other-bundle.pem"
        other.write_text(ca.CertificateAuthority(tmp_path / "other-ca").trust_bundle_pem)
        wrong = GrpcSigner(env.address, env.auth(bundle=other), timeout=5)
        try:
            with pytest.raises(SignError) as exc:
                await wrong(csr_for()[0], "default", "web")
            assert "TLS handshake with the control plane" in str(exc.value)
            assert "does not verify against the root bundle" in str(exc.value) and str(other) in str(exc.value)
            # a plaintext client gets nothing from the TLS port
            async with grpc.aio.insecure_channel(env.address) as ch:
                call = ch.unary_unary(SIGN_METHOD, request_serializer=cpb.SignRequest.SerializeToString,
                                      response_deserializer=cpb.SignResponse.FromString)
                with pytest.raises(grpc.aio.AioRpcError) as exc2:
                    await call(cpb.SignRequest(), timeout=5,
                               metadata=((NODE_METADATA, "node1"), (TOKEN_METADATA, "Bearer " + env.token["node1"])))
                assert exc2.value.code() == grpc.StatusCode.UNAVAILABLE
            # the serving certificate names what it was given and chains to the CA
            leaf = x509.load_pem_x509_certificates(env.cp.serving.chain_pem.encode())[0]
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        finally:
            await wrong.close()
            await env.stop()
    run(scenario)


def test_agent_stream_and_certificates_end_to_end(tmp_path):
    """A ControlPlaneClient and a CertificateManager, as the agent wires them, over TLS + token."""
    async def scenario():
        env = await Env(tmp_path).start()
        auth = env.auth("node1")
        state = AgentState()
        registry = CollectorRegistry()
        mgr = CertificateManager("node1", GrpcSigner(env.address, auth), tmp_path / "certs", registry)
        client = ControlPlaneClient(env.address, "node1", state, None, registry, auth=auth,
                                    extra_roots=mgr.trust_bundle_pem, backoff_initial=0.05, backoff_max=0.3)
        tasks = [asyncio.create_task(client.run()), asyncio.create_task(mgr.run(state))]
        try:
            web = spiffe_id("cluster.local", "default", "web")
            await wait_until(lambda: mgr.server_context(web) is not None, "a certificate for default/web")
            assert client.status()["connected"]
            assert [c["identity"] for c in mgr.status()] == [web.uri]  # db is on node2
            assert mgr.readiness()[0]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await mgr.sign.close()
            await env.stop()
    run(scenario)


def test_wrong_bundle_makes_the_stream_say_why(tmp_path):
    async def scenario():
        env = await Env(tmp_path).start()
        other = tmp_path / "other-bundle.pem"
        other.write_text(ca.CertificateAuthority(tmp_path / "other-ca").trust_bundle_pem)
        client = ControlPlaneClient(env.address, "node1", AgentState(), None, CollectorRegistry(),
                                    auth=env.auth(bundle=other), backoff_initial=0.05, backoff_max=0.2)
        task = asyncio.create_task(client.run())
        try:
            await wait_until(lambda: "TLS handshake" in client.status()["message"], "the TLS error on the status")
            assert "does not verify against the root bundle" in client.status()["message"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await env.stop()
    run(scenario)


def test_ca_rotation_is_picked_up_by_the_running_control_plane(tmp_path):
    async def scenario():
        env = await Env(tmp_path).start()
        signer = GrpcSigner(env.address, env.auth())
        try:
            first = await signer(csr_for()[0], "default", "web")
            assert len(x509.load_pem_x509_certificates(first.trust_bundle_pem.encode())) == 1
            ca.rotate_prepare(env.cp.ca.ca_dir)
            env.cp.reload_security()
            second = await signer(csr_for()[0], "default", "web")
            assert len(x509.load_pem_x509_certificates(second.trust_bundle_pem.encode())) == 2
            ca.rotate_activate(env.cp.ca.ca_dir)
            env.cp.reload_security()
            # the serving certificate is re-issued from the new CA; the agent still verifies it
            # because it trusts the bundle it got from the CA (signer.extra_roots)
            signer.extra_roots = lambda: second.trust_bundle_pem
            third = await signer(csr_for()[0], "default", "web")
            leaf = x509.load_pem_x509_certificates(third.cert_chain_pem.encode())[0]
            assert leaf.issuer != x509.load_pem_x509_certificates(first.cert_chain_pem.encode())[0].issuer
            assert env.cp.serving._signer is env.cp.ca.signer  # re-issued on the new handshake
            # an agent that only has the old bootstrap bundle can no longer verify the port
            stale = GrpcSigner(env.address, env.auth(), timeout=5)
            with pytest.raises(SignError, match="TLS handshake"):
                await stale(csr_for()[0], "default", "web")
            await stale.close()
        finally:
            await signer.close()
            await env.stop()
    run(scenario)
