"""The agent's certificate manager on a fake clock: issuance per local identity, rotation at
half life with jitter, backoff while the CA is unreachable, fail-closed expiry, dropped
identities, adoption after a restart, and a real TLS handshake between its contexts."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time

import grpc
import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from controlplane.api import certificates_pb2 as cpb
from controlplane.auth import NodeIdentities
from controlplane.ca import CertificateAuthority
from controlplane.certservice import CertificateService
from controlplane.metrics import ControlPlaneMetrics
from nodeagent.identity import leaf_identity_der, spiffe_id
from nodeagent.identity.manager import (BACKOFF_MAX_WITHOUT_CERTIFICATE, CertificateManager, backoff_delay, renewal_time, trust_domain_of,
                                        wanted_identities)
from nodeagent.state import ConfigObject, NodeSnapshot, Workload
from tests.test_ca import handshake

NODE = "node1"
TTL = 3600.0


class Clock:
    def __init__(self, t: float | None = None) -> None:
        self.t = time.time() if t is None else t

    def __call__(self) -> float:
        return self.t


class FakeCA:
    """The real CA and Sign decision behind an in-process signer that can be made to fail."""

    def __init__(self, tmp_path, clock, ttl: float = TTL, trust_domain: str = "cluster.local") -> None:
        self.ca = CertificateAuthority(tmp_path / "ca", clock=clock)
        self.policy = NodeIdentities(trust_domain=trust_domain, certificate_ttl=ttl,
                                     by_node={NODE: frozenset({("default", "web"), ("default", "api"),
                                                               ("prod", "web")})})
        self.service = CertificateService(self.ca, None, lambda: self.policy, ControlPlaneMetrics())
        self.fail: Exception | None = None
        self.tamper = None
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, csr_pem: str, namespace: str, service_account: str):
        self.calls.append((namespace, service_account))
        if self.fail is not None:
            raise self.fail
        code, _result, reason, resp = self.service.decide(
            NODE, cpb.SignRequest(csr_pem=csr_pem, namespace=namespace, service_account=service_account))
        if code is not grpc.StatusCode.OK:
            raise RuntimeError(f"{code.name}: {reason}")
        return self.tamper(resp) if self.tamper else resp


def snap(*sas: tuple[str, str], remote: tuple[str, str] = ("default", "remote"), trust_domain: str | None = None):
    wl = [Workload(name=f"w{i}", namespace=ns, node=NODE, address=f"198.18.1.{i + 1}", service_account=sa)
          for i, (ns, sa) in enumerate(sas)]
    wl.append(Workload(name="far", namespace=remote[0], node="node2", address="198.18.2.1",
                       service_account=remote[1]))
    config = (ConfigObject(kind="MeshConfig", namespace="default", name="default",
                           spec=json.dumps({"trustDomain": trust_domain})),) if trust_domain else ()
    return NodeSnapshot(node=NODE, workloads=tuple(wl), config=config)


def make(tmp_path, clock=None, rand=lambda: 0.5, **kw):
    clock = clock or Clock()
    fake = FakeCA(tmp_path, clock, **kw)
    registry = CollectorRegistry()
    mgr = CertificateManager(NODE, fake, tmp_path / "certs", registry, clock=clock, rand=rand)
    return mgr, fake, clock, registry


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


WEB = spiffe_id("cluster.local", "default", "web")
API = spiffe_id("cluster.local", "default", "api")


def test_identities_come_from_local_workloads_and_meshconfig():
    s = snap(("default", "web"), ("default", "web"), ("prod", "web"), trust_domain="corp.example")
    assert trust_domain_of(s) == "corp.example"
    assert wanted_identities(s) == {spiffe_id("corp.example", "default", "web"),
                                    spiffe_id("corp.example", "prod", "web")}
    assert trust_domain_of(snap()) == "cluster.local"
    assert wanted_identities(None) == set()


def test_renewal_and_backoff_schedules():
    assert renewal_time(100.0, 200.0, 0.0) == 150.0  # half life without jitter
    assert renewal_time(100.0, 200.0, 1.0) == pytest.approx(140.0)  # up to 10 % earlier
    delays = [backoff_delay(a, 1.0, initial=1.0, maximum=60.0) for a in range(8)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(3, 0.0) == pytest.approx(0.8)  # jitter never reaches zero


def test_issues_one_certificate_per_local_identity(tmp_path):
    async def main():
        mgr, fake, clock, registry = make(tmp_path)
        mgr.sync(snap(("default", "web"), ("default", "web"), ("default", "api")))
        assert mgr.server_context(WEB) is None  # nothing yet: fail closed
        assert mgr.readiness()[0] is False and "no certificate yet" in mgr.readiness()[1]
        await mgr.tick()
        assert sorted(fake.calls) == [("default", "api"), ("default", "web")]  # never the remote one
        assert mgr.server_context(WEB) is not None and mgr.client_context(API) is not None
        assert mgr.readiness() == (True, "certificates valid")
        st = {c["identity"]: c for c in mgr.status()}
        assert set(st) == {WEB.uri, API.uri}
        web = st[WEB.uri]
        assert web["state"] == "valid" and web["serial"] and web["not_after"] and web["next_renewal"]
        assert "PRIVATE" not in json.dumps(mgr.status())  # never key material
        key = tmp_path / "certs" / "cluster.local_default_web" / "key.pem"
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "certs").st_mode) == 0o700
        expiry = registry.get_sample_value("hostmesh_agent_certificate_expiry_seconds", {"identity": WEB.uri})
        assert expiry == pytest.approx(TTL, abs=2)
        assert registry.get_sample_value("hostmesh_agent_certificate_renewals_total", {"result": "issued"}) == 2
    run(main())


def test_rotation_at_half_life_with_jitter_swaps_contexts(tmp_path):
    async def main():
        mgr, fake, clock, _ = make(tmp_path, rand=lambda: 0.3)
        mgr.sync(snap(("default", "web")))
        await mgr.tick()
        first = mgr.server_context(WEB)
        serial = mgr.status()[0]["serial"]
        due = mgr.next_due()
        assert due == pytest.approx(clock.t + TTL * (0.5 - 0.1 * 0.3))
        clock.t = due - 1
        await mgr.tick()
        assert len(fake.calls) == 1 and mgr.server_context(WEB) is first  # not yet
        clock.t = due
        await mgr.tick()
        assert len(fake.calls) == 2
        assert mgr.server_context(WEB) is not first and mgr.status()[0]["serial"] != serial
        assert mgr.status()[0]["renewals"] == 2
    run(main())


def test_ca_unreachable_keeps_the_certificate_backs_off_then_fails_closed(tmp_path):
    async def main():
        mgr, fake, clock, registry = make(tmp_path, rand=lambda: 1.0)
        mgr.sync(snap(("default", "web")))
        await mgr.tick()
        ctx = mgr.server_context(WEB)
        not_after = fake.ca.clock() + TTL
        fake.fail = ConnectionError("control plane unreachable")
        clock.t = mgr.next_due()
        retries = []
        for _ in range(6):
            await mgr.tick()
            retries.append(mgr.next_due() - clock.t)
            assert mgr.server_context(WEB) is ctx  # the current certificate stays in force
            clock.t = mgr.next_due()
        assert retries == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]  # exponential (rand=1.0: the full step)
        st = mgr.status()[0]
        assert st["state"] == "renewing" and "unreachable" in st["last_error"] and st["failed_attempts"] == 6
        assert mgr.readiness()[0]  # still valid
        clock.t = not_after + 1
        assert mgr.server_context(WEB) is None and mgr.client_context(WEB) is None  # expired: fail closed
        ok, why = mgr.readiness()
        assert not ok and "expired" in why and "refused" in why and "unreachable" in why
        assert mgr.status()[0]["state"] == "expired"
        assert registry.get_sample_value("hostmesh_agent_certificate_expiry_seconds", {"identity": WEB.uri}) < 0
        # no valid certificate: retries come at most BACKOFF_MAX_WITHOUT_CERTIFICATE apart
        assert mgr.next_due() <= not_after  # the last retry with a valid one was due before expiry
        for _ in range(3):
            clock.t = max(clock.t, mgr.next_due())
            await mgr.tick()
            assert mgr.next_due() - clock.t <= BACKOFF_MAX_WITHOUT_CERTIFICATE
        # the CA is back: the next retry heals it
        fake.fail = None
        clock.t = mgr.next_due()
        await mgr.tick()
        assert mgr.server_context(WEB) is not None and mgr.readiness()[0]
    run(main())


@pytest.mark.parametrize("tamper,message", [
    (lambda r: cpb.SignResponse(cert_chain_pem="junk", trust_bundle_pem=r.trust_bundle_pem), "not PEM"),
    (lambda r: cpb.SignResponse(cert_chain_pem=r.cert_chain_pem, trust_bundle_pem=_other_root()),
     "does not chain to any root"),
    (lambda r: _swap_identity(r), "was asked for"),
])
def test_a_bad_answer_from_the_ca_is_not_installed(tmp_path, tamper, message):
    async def main():
        mgr, fake, clock, _ = make(tmp_path)
        fake.tamper = tamper
        mgr.sync(snap(("default", "web")))
        await mgr.tick()
        assert mgr.server_context(WEB) is None
        assert message in mgr.status()[0]["last_error"]
    run(main())


def _other_root() -> str:
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as t:
        return CertificateAuthority(Path(t)).trust_bundle_pem


def _swap_identity(_resp):
    """An answer for another identity (a CA bug or an attacker in the middle)."""
    import tempfile
    from pathlib import Path

    from tests.test_ca import csr_for
    with tempfile.TemporaryDirectory() as t:
        other = CertificateAuthority(Path(t))
        issued = other.sign_workload(csr_for()[0], "spiffe://cluster.local/ns/default/sa/admin", 3600)
        return cpb.SignResponse(cert_chain_pem=issued.chain_pem, trust_bundle_pem=other.trust_bundle_pem)


def test_wrong_key_in_the_answer_is_refused(tmp_path):
    async def main():
        mgr, fake, clock, _ = make(tmp_path)

        def other_key(resp):
            from tests.test_ca import csr_for
            issued = fake.ca.sign_workload(csr_for()[0], WEB.uri, 3600)
            return cpb.SignResponse(cert_chain_pem=issued.chain_pem, trust_bundle_pem=resp.trust_bundle_pem)

        fake.tamper = other_key
        mgr.sync(snap(("default", "web")))
        await mgr.tick()
        assert mgr.server_context(WEB) is None
        assert "not for the key this agent generated" in mgr.status()[0]["last_error"]
    run(main())


def test_identity_leaving_the_node_is_dropped_with_its_files(tmp_path):
    async def main():
        mgr, fake, clock, registry = make(tmp_path)
        mgr.sync(snap(("default", "web"), ("default", "api")))
        await mgr.tick()
        web_dir = tmp_path / "certs" / "cluster.local_default_web"
        assert web_dir.exists()
        mgr.sync(snap(("default", "api")))
        assert not web_dir.exists() and mgr.server_context(WEB) is None
        assert [c["identity"] for c in mgr.status()] == [API.uri]
        assert registry.get_sample_value("hostmesh_agent_certificate_expiry_seconds", {"identity": WEB.uri}) is None
    run(main())


def test_trust_domain_change_reissues(tmp_path):
    async def main():
        mgr, fake, clock, _ = make(tmp_path, trust_domain="corp.example")
        mgr.sync(snap(("default", "web"), trust_domain="corp.example"))
        assert mgr.trust_domain == "corp.example"
        await mgr.tick()
        assert [c["identity"] for c in mgr.status()] == ["spiffe://corp.example/ns/default/sa/web"]
        assert mgr.server_context(spiffe_id("corp.example", "default", "web")) is not None
    run(main())


def test_restarted_agent_adopts_valid_certificates_from_disk(tmp_path):
    async def main():
        mgr, fake, clock, _ = make(tmp_path)
        mgr.sync(snap(("default", "web")))
        await mgr.tick()
        serial = mgr.status()[0]["serial"]
        fake.fail = ConnectionError("down")
        again = CertificateManager(NODE, fake, tmp_path / "certs", CollectorRegistry(), clock=clock,
                                   rand=lambda: 0.5)
        again.sync(snap(("default", "web")))
        assert again.server_context(WEB) is not None and again.status()[0]["serial"] == serial
        # an expired one on disk is not adopted
        clock.t += TTL + 1
        third = CertificateManager(NODE, fake, tmp_path / "certs", CollectorRegistry(), clock=clock)
        third.sync(snap(("default", "web")))
        assert third.server_context(WEB) is None and third.status()[0]["state"] == "pending"
    run(main())


def test_contexts_from_the_manager_complete_a_real_mtls_handshake(tmp_path):
    async def main():
        mgr, fake, clock, _ = make(tmp_path)
        mgr.sync(snap(("default", "web"), ("default", "api")))
        await mgr.tick()
        server, client = mgr.server_context(WEB), mgr.client_context(API)
        peer = await asyncio.to_thread(handshake, server, client)
        assert leaf_identity_der(peer, mgr.trust_domain) == API
        assert server.minimum_version.name == "TLSv1_3"
        # a client without a certificate is refused by the server context
        import ssl
        bare = ssl.create_default_context()
        bare.check_hostname = False
        bare.load_verify_locations(cadata=fake.ca.trust_bundle_pem)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            await asyncio.to_thread(handshake, server, bare)
    run(main())


def test_run_follows_the_agent_state(tmp_path):
    from nodeagent.state import AgentState

    async def main():
        mgr, fake, _clock, _ = make(tmp_path, clock=time.time)
        state = AgentState()
        task = asyncio.create_task(mgr.run(state))
        try:
            state.apply(snap(("default", "web")))
            for _ in range(500):
                if mgr.server_context(WEB) is not None:
                    break
                await asyncio.sleep(0.01)
            assert mgr.server_context(WEB) is not None
            state.apply(snap(("default", "api")))
            for _ in range(500):
                if mgr.server_context(API) is not None and mgr.server_context(WEB) is None:
                    break
                await asyncio.sleep(0.01)
            assert mgr.server_context(API) is not None and mgr.server_context(WEB) is None
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    run(main())


def test_chain_pem_on_disk_is_leaf_first(tmp_path):
    async def main():
        mgr, fake, clock, _ = make(tmp_path)
        mgr.sync(snap(("default", "web")))
        await mgr.tick()
        chain = x509.load_pem_x509_certificates(
            (tmp_path / "certs" / "cluster.local_default_web" / "cert-chain.pem").read_bytes())
        assert chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier) == [WEB.uri]
    run(main())
