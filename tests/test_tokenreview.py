"""Agents in a cluster authenticate with projected service-account tokens, checked by
TokenReview against the in-repo fake API server with the real client: the token must be
authenticated for our audience, belong to the agents' service account and be bound to the
node the call names; the node authorizer still decides the identities; an API server that
cannot be asked means refusal; reviews are cached; nodes with token files keep them; and
the agent re-reads a rotated token file."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import yaml

from controlplane.auth import Unauthenticated
from controlplane.process import ControlPlane, Security
from controlplane.sources.kubernetes import KubeSettings
from controlplane.tokenreview import ReviewPolicy, TokenReviewer, judge
from meshlab.fakekube import FakeKube, from_mesh_document
from nodeagent.identity.cpauth import ControlPlaneAuth, GrpcSigner, SignError
from tests.test_ca import csr_for

pytestmark = pytest.mark.timeout(60)
POLICY = ReviewPolicy()


def answer(authenticated=True, user="system:serviceaccount:hostmesh-system:hostmesh-agent", node="node1",
           audiences=("hostmesh",)):
    return {"status": {"authenticated": authenticated, "audiences": list(audiences),
                       "user": {"username": user, "extra": {"authentication.kubernetes.io/node-name": [node]}}}}


@pytest.mark.parametrize("ans, node, why", [
    (answer(), "node1", ""),
    (answer(authenticated=False), "node1", "did not authenticate"),
    (answer(node="node2"), "node1", "bound to node 'node2', not 'node1'"),
    (answer(user="system:serviceaccount:default:app"), "node1", "not to the agents' service account"),
    (answer(audiences=("other",)), "node1", "not for audience 'hostmesh'"),
    ({"status": {"authenticated": True, "user": {"username": "system:serviceaccount:hostmesh-system:hostmesh-agent"}}},
     "node1", "not bound to a node"),
])
def test_judging_a_review(ans, node, why):
    got = judge(ans, node, POLICY)
    assert (why in got) if why else got == ""


def test_a_review_is_cached_and_an_unreachable_api_server_refuses():
    calls = []

    async def review(body):
        calls.append(body)
        if body["spec"]["token"] == "down":
            raise ConnectionError("connection refused")
        return answer()

    async def main():
        now = [0.0]
        r = TokenReviewer(review, clock=lambda: now[0])
        assert await r.check("node1", "t") == "node1"
        assert await r.check("node1", "t") == "node1" and len(calls) == 1   # cached
        now[0] += POLICY.cache_ttl + 1
        await r.check("node1", "t")
        assert len(calls) == 2                                             # expired: asked again
        with pytest.raises(Unauthenticated, match="cannot review the token of node 'node1'"):
            await r.check("node1", "down")
        with pytest.raises(Unauthenticated, match="bound to node 'node1', not 'node2'"):
            await r.check("node2", "t")                                    # the cache is per node too
    asyncio.run(main())


# ---------------------------------------------------------------------- end to end
@pytest.fixture
def cluster(tmp_path):
    fake = FakeKube(bookmark_interval=0.3, hostmesh_kinds=("Workload",)).start()   # no other CRDs installed
    for doc in ({"apiVersion": "hostmesh.io/v1alpha1", "kind": "Workload",
                 "metadata": {"name": "web-1", "namespace": "default"},
                 "spec": {"node": "node1", "address": "198.18.1.1", "serviceAccount": "web", "ports": []}},
                {"apiVersion": "hostmesh.io/v1alpha1", "kind": "Workload",
                 "metadata": {"name": "db-1", "namespace": "default"},
                 "spec": {"node": "node2", "address": "198.18.2.1", "serviceAccount": "db", "ports": []}}):
        fake.apply(from_mesh_document(doc))
    fake.add_token("sa-node1-projected-token", namespace="hostmesh-system", service_account="hostmesh-agent", node="node1")
    fake.add_token("other-sa-projected-token", namespace="default", service_account="app", node="node1")
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(fake.kubeconfig())
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "bare1.token").write_text("bare-metal-node-token-0123456789\n")
    (tokens / "bare1.token").chmod(0o600)
    cp = ControlPlane(None, grpc_address="127.0.0.1:0", http_host="127.0.0.1", http_port=0,
                      security=Security(ca_dir=str(tmp_path / "ca"), tokens_dir=str(tokens),
                                        tls_names=("127.0.0.1",), token_review=POLICY),
                      kubernetes=KubeSettings(str(cfg)))
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(cp.ca.trust_bundle_pem)
    yield fake, cp, bundle, tmp_path
    fake.stop()


def sign(cp, bundle, tmp_path, node, token, sa):
    tf = tmp_path / f"tok-{node}-{time.monotonic_ns()}"
    tf.write_text(token + "\n")
    tf.chmod(0o600)
    auth = ControlPlaneAuth.from_files(node, str(tf), str(bundle))
    signer = GrpcSigner(f"127.0.0.1:{cp.grpc.port}", auth)
    csr, _ = csr_for()

    async def call():
        try:
            return await signer(csr, "default", sa)
        finally:
            await signer.close()
    return call()


def test_agents_sign_in_with_their_service_account_token(cluster):
    fake, cp, bundle, tmp = cluster

    async def main():
        task = asyncio.create_task(cp.run())
        try:
            deadline = time.monotonic() + 20
            while not (cp.grpc.port and cp.identities is not None):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            resp = await sign(cp, bundle, tmp, "node1", "sa-node1-projected-token", "web")
            assert resp.spiffe_id.endswith("/ns/default/sa/web")
            # the node authorizer still applies: node1 has no db workload
            with pytest.raises(SignError) as exc:
                await sign(cp, bundle, tmp, "node1", "sa-node1-projected-token", "db")
            assert exc.value.status.name == "PERMISSION_DENIED"
            for node, token, why in (("node2", "sa-node1-projected-token", "bound to node 'node1', not 'node2'"),
                                     ("node1", "other-sa-projected-token", "not to the agents' service account"),
                                     ("node1", "forged-token-000000", "did not authenticate")):
                with pytest.raises(SignError) as exc:
                    await sign(cp, bundle, tmp, node, token, "web")
                assert exc.value.status.name == "UNAUTHENTICATED" and why in str(exc.value), str(exc.value)
            reviews = len(fake.reviews)
            await sign(cp, bundle, tmp, "node1", "sa-node1-projected-token", "web")
            assert len(fake.reviews) == reviews      # cached
            # a node with a token file keeps using it (no review)
            with pytest.raises(SignError) as exc:
                await sign(cp, bundle, tmp, "bare1", "wrong-token-0000000000", "web")
            assert "invalid bootstrap token" in str(exc.value) and len(fake.reviews) == reviews
        finally:
            cp._stop.set()
            await asyncio.wait_for(task, 10)
    asyncio.run(main())


def test_the_agent_reads_a_rotated_token_file(tmp_path, cluster):
    fake, cp, bundle, _ = cluster
    tf = tmp_path / "projected-token"
    tf.write_text("first-token-000000000000\n")
    tf.chmod(0o400)
    auth = ControlPlaneAuth.from_files("node1", str(tf), str(bundle))
    assert dict(auth.metadata())["authorization"] == "Bearer first-token-000000000000"
    tmp = tmp_path / ".rotated"
    tmp.write_text("second-token-00000000000\n")
    tmp.chmod(0o400)
    os.replace(tmp, tf)           # how the kubelet swaps a projected volume's file
    assert dict(auth.metadata())["authorization"] == "Bearer second-token-00000000000"
    tf.unlink()                   # gone for a moment: the last good token
    assert dict(auth.metadata())["authorization"] == "Bearer second-token-00000000000"
