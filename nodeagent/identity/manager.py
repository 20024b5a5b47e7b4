"""The agent's certificate manager: one key and certificate per local workload identity,
obtained from the control plane's CA and rotated before expiry. Implements
``WorkloadIdentities`` for the proxy.

Per identity (from the snapshot's local workloads; trust domain from its MeshConfig):

* a fresh ECDSA P-256 key and a CSR, sent with ``Signer.sign`` (the gRPC Certificates
  service; any async callable in tests);
* the answer is checked before use: the leaf names exactly the identity asked for
  (``leaf_identity``), carries our public key, chains to the returned trust bundle and is
  valid now. Then chain + key are written (0600) into ``cert_dir/<td>_<ns>_<sa>/`` and
  fresh server and client ``SSLContext``s are built and swapped in at once (connections
  already running keep the context they started with);
* renewal at 40-50 % of the lifetime left when it arrived (half life minus up to
  ``jitter``, so 1000 nodes do not renew in the same second); on failure the current
  certificate stays and the attempt is retried with exponential backoff and full jitter;
* past ``not_after`` the identity has no context: ``server_context``/``client_context``
  return None, the proxy refuses its mesh traffic (never plaintext) and /ready says why;
* an identity no local workload runs as any more is dropped and its files removed.

The clock and the random source are injected: ``tick()`` does whatever is due at
``clock()``, so tests drive rotation, backoff and expiry without sleeping. ``run()``
calls it in the agent's loop; the only I/O that waits is the gRPC call (grpc.aio).

Metrics: ``hostmesh_agent_certificate_expiry_seconds{identity}`` (seconds until the
current certificate expires; negative once expired), ``hostmesh_agent_certificate_renewals_total{result}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeagent.identity.files import write_private
from nodeagent.identity.spiffe import (DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId, leaf_identity, spiffe_id,
                                       verify_chain)
from nodeagent.state import NodeSnapshot

log = logging.getLogger("hostmesh.agent.certs")

#: (csr_pem, namespace, service_account) -> the SignResponse (certificates.proto) or raises
SignFunc = Callable[[str, str, str], Awaitable[object]]

RENEW_FRACTION = 0.5
RENEW_JITTER = 0.1
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
BACKOFF_MAX_WITHOUT_CERTIFICATE = 5.0


def trust_domain_of(snapshot: NodeSnapshot | None) -> str:
    """The mesh's trust domain from the snapshot's MeshConfig (default cluster.local)."""
    for c in snapshot.config if snapshot else ():
        if c.kind == "MeshConfig":
            try:
                td = json.loads(c.spec).get("trustDomain")
            except (ValueError, AttributeError):
                td = None
            if isinstance(td, str) and td:
                return td
    return DEFAULT_TRUST_DOMAIN


def wanted_identities(snapshot: NodeSnapshot | None) -> set[SpiffeId]:
    if snapshot is None:
        return set()
    td = trust_domain_of(snapshot)
    out = set()
    for w in snapshot.local_workloads():
        try:
            out.add(spiffe_id(td, w.namespace, w.service_account or "default"))
        except IdentityError as exc:
            log.error("workload has no valid identity; it gets no certificate",
                      extra={"workload": f"{w.namespace}/{w.name}", "error": str(exc)})
    return out


def renewal_time(received: float, not_after: float, rand: float, jitter: float = RENEW_JITTER) -> float:
    """When to renew a certificate received at ``received``: at (0.5 - jitter*rand) of what
    was left of its life, so never later than half life."""
    return received + (not_after - received) * (RENEW_FRACTION - jitter * rand)


def backoff_delay(attempt: int, rand: float, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX) -> float:
    """Exponential backoff with full jitter, at least 10 % of the step so retries never spin."""
    step = min(maximum, initial * 2 ** min(attempt, 32))
    return step * (0.1 + 0.9 * rand)


@dataclass
class Issued:
    """The certificate in force for one identity (key material stays in here and the files)."""

    chain: list[x509.Certificate]
    bundle_pem: str
    serial: str
    not_before: float
    not_after: float
    received: float
    server: ssl.SSLContext
    client: ssl.SSLContext


@dataclass
class Held:
    identity: SpiffeId
    directory: Path
    issued: Issued | None = None
    next_attempt: float = 0.0
    attempts: int = 0  # consecutive failures
    last_error: str = ""
    last_error_time: float | None = None
    renewing: bool = False
    renewals: int = 0


def check_response(resp, ident: SpiffeId, key: ec.EllipticCurvePrivateKey, now: float
                   ) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """The (chain, roots) of a Sign answer, or IdentityError saying why it is unusable."""
    try:
        chain = x509.load_pem_x509_certificates(resp.cert_chain_pem.encode())
        roots = x509.load_pem_x509_certificates(resp.trust_bundle_pem.encode())
    except ValueError as exc:
        raise IdentityError(f"the CA's answer for {ident} is not PEM certificates: {exc}") from None
    got = leaf_identity(chain[0], ident.trust_domain)
    if got != ident:
        raise IdentityError(f"the CA returned a certificate for {got}, {ident} was asked for")
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if chain[0].public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        raise IdentityError(f"the CA's certificate for {ident} is not for the key this agent generated")
    verify_chain(chain, roots, now)
    return chain, roots


@dataclass(frozen=True)
class _Answer:
    """A Sign answer read back from disk (the fields check_response reads)."""

    cert_chain_pem: str
    trust_bundle_pem: str


def build_contexts(cert_file: Path, key_file: Path, bundle_pem: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: TLS 1.3 only, our chain and key, peers verified against the
    bundle. check_hostname is off: the caller checks the peer's SPIFFE ID (leaf_identity)."""
    out = []
    for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=bundle_pem)
        ctx.load_cert_chain(str(cert_file), str(key_file))
        out.append(ctx)
    return out[0], out[1]


class CertificateManager:
    """Implements WorkloadIdentities; ``sync(snapshot)`` sets the identities, ``tick()`` renews."""

    def __init__(self, node: str, sign: SignFunc, cert_dir: str | Path, registry: CollectorRegistry, *,
                 clock: Callable[[], float] = time.time, rand: Callable[[], float] = random.random,
                 jitter: float = RENEW_JITTER, backoff_initial: float = BACKOFF_INITIAL,
                 backoff_max: float = BACKOFF_MAX) -> None:
        self.node = node
        self.sign = sign
        self.cert_dir = Path(cert_dir)
        self.clock = clock
        self.rand = rand
        self.jitter = jitter
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._trust_domain = DEFAULT_TRUST_DOMAIN
        self._held: dict[SpiffeId, Held] = {}
        self._synced: NodeSnapshot | None = None
        self._wake = asyncio.Event()
        self._subscribers: list[Callable[[], None]] = []
        self.expiry = Gauge("hostmesh_agent_certificate_expiry_seconds",
                            "Seconds until the current certificate of each local identity expires",
                            ["identity"], registry=registry)
        self.renewal_results = Counter("hostmesh_agent_certificate_renewals",
                                       "Certificate requests to the CA by result (issued, failed)", ["result"],
                                       registry=registry)

    # ------------------------------------------------------------------ WorkloadIdentities
    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    def subscribe(self, fn: Callable[[], None]) -> None:
        """``fn()`` after a certificate was installed or an identity dropped (files complete)."""
        self._subscribers.append(fn)

    def _changed(self) -> None:
        for fn in self._subscribers:
            fn()

    def held_files(self) -> list[dict]:
        """Per identity with a certificate: where its files are, serial and expiry (what a
        proxy worker needs to build the same contexts; never key material itself)."""
        return [{"uri": h.identity.uri, "dir": str(h.directory), "serial": h.issued.serial,
                 "not_after": h.issued.not_after}
                for h in sorted(self._held.values(), key=lambda h: h.identity.uri) if h.issued is not None]

    def _valid(self, identity: SpiffeId) -> Issued | None:
        h = self._held.get(identity)
        if h is None or h.issued is None or self.clock() >= h.issued.not_after:
            return None
        return h.issued

    def server_context(self, identity: SpiffeId) -> ssl.SSLContext | None:
        issued = self._valid(identity)
        return issued.server if issued else None

    def client_context(self, identity: SpiffeId) -> ssl.SSLContext | None:
        issued = self._valid(identity)
        return issued.client if issued else None

    # ------------------------------------------------------------------ identities
    def sync(self, snapshot: NodeSnapshot | None) -> None:
        """Make the held identities those of the snapshot's local workloads."""
        self._synced = snapshot
        if snapshot is None:
            return
        self._trust_domain = trust_domain_of(snapshot)
        wanted = wanted_identities(snapshot)
        for ident in [i for i in self._held if i not in wanted]:
            self._drop(ident)
        for ident in wanted - self._held.keys():
            d = self.cert_dir / f"{ident.trust_domain}_{ident.namespace}_{ident.service_account}"
            h = self._held[ident] = Held(identity=ident, directory=d, next_attempt=self.clock())
            if not self._load_existing(h):
                log.info("new local identity; requesting a certificate", extra={"identity": ident.uri})
        self._wake.set()

    def _load_existing(self, h: Held) -> bool:
        """Adopt a still-valid certificate left by a previous run of the agent (so a restart
        while the CA is unreachable keeps serving); anything unusable is ignored."""
        cert_file, key_file, bundle_file = (h.directory / n for n in ("cert-chain.pem", "key.pem", "root-cert.pem"))
        if not cert_file.exists():
            return False
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            resp = _Answer(cert_file.read_text(), bundle_file.read_text())
            now = self.clock()
            chain, _ = check_response(resp, h.identity, key, now)
            self._install(h, chain, resp.trust_bundle_pem, key, now, counted=False)
        except (OSError, ValueError, TypeError, IdentityError, ssl.SSLError) as exc:
            log.info("ignoring the certificate left on disk", extra={"identity": h.identity.uri, "error": str(exc)})
            return False
        log.info("adopted the certificate left by the previous run", extra={"identity": h.identity.uri})
        return True

    def _drop(self, ident: SpiffeId) -> None:
        h = self._held.pop(ident)
        shutil.rmtree(h.directory, ignore_errors=True)
        try:
            self.expiry.remove(ident.uri)
        except KeyError:
            pass
        log.info("identity left this node; certificate dropped", extra={"identity": ident.uri})
        self._changed()

    # ------------------------------------------------------------------ renewal
    def next_due(self) -> float | None:
        times = [h.next_attempt for h in self._held.values() if not h.renewing]
        return min(times) if times else None

    def _start_due(self) -> list[asyncio.Task]:
        """Start a request for every identity due now; each wakes run() when it ends."""
        now = self.clock()
        tasks = []
        for h in self._held.values():
            if not h.renewing and h.next_attempt <= now:
                h.renewing = True  # set before the task runs, so no identity is started twice
                t = asyncio.ensure_future(self._renew(h))
                t.add_done_callback(lambda _t: self._wake.set())
                tasks.append(t)
        return tasks

    async def tick(self) -> None:
        """Request a certificate for every identity that is due now and wait for the answers."""
        tasks = self._start_due()
        if tasks:
            await asyncio.gather(*tasks)

    async def _renew(self, h: Held) -> None:
        ident = h.identity
        try:
            key = ec.generate_private_key(ec.SECP256R1())
            csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
                   .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ident.uri)]),
                                  critical=False)
                   .sign(key, hashes.SHA256()))
            resp = await self.sign(csr.public_bytes(serialization.Encoding.PEM).decode(), ident.namespace,
                                   ident.service_account)
            if self._held.get(ident) is not h:
                return  # dropped while we waited
            now = self.clock()
            chain, _roots = check_response(resp, ident, key, now)
            self._install(h, chain, resp.trust_bundle_pem, key, now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the CA down, a denial, a bad answer: keep what we have, retry
            self._failed(h, exc)
        finally:
            h.renewing = False

    def _install(self, h: Held, chain: list[x509.Certificate], bundle_pem: str,
                 key: ec.EllipticCurvePrivateKey, now: float, counted: bool = True) -> None:
        h.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.cert_dir, 0o700)
        cert_file, key_file = h.directory / "cert-chain.pem", h.directory / "key.pem"
        write_private(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        write_private(cert_file, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
        write_private(h.directory / "root-cert.pem", bundle_pem.encode())
        server, client = build_contexts(cert_file, key_file, bundle_pem)
        leaf = chain[0]
        not_after = leaf.not_valid_after_utc.timestamp()
        h.issued = Issued(chain=chain, bundle_pem=bundle_pem, serial=f"{leaf.serial_number:x}",
                          not_before=leaf.not_valid_before_utc.timestamp(), not_after=not_after, received=now,
                          server=server, client=client)
        h.attempts = 0
        h.last_error = ""
        h.next_attempt = renewal_time(now, not_after, self.rand(), self.jitter)
        self.expiry.labels(h.identity.uri).set_function(lambda: not_after - self.clock())
        if counted:
            h.renewals += 1
            self.renewal_results.labels("issued").inc()
        log.info("certificate installed", extra={"identity": h.identity.uri, "serial": h.issued.serial,
                                                 "not_after": _iso(not_after), "renew_at": _iso(h.next_attempt)})
        self._changed()

    def _failed(self, h: Held, exc: Exception) -> None:
        now = self.clock()
        h.last_error = _describe_error(exc)
        h.last_error_time = now
        valid = h.issued is not None and now < h.issued.not_after
        # without a valid certificate the identity's traffic is refused: retry sooner, so a CA
        # that comes back restores traffic within seconds; with one, never retry after it expires
        maximum = self.backoff_max if valid else min(self.backoff_max, BACKOFF_MAX_WITHOUT_CERTIFICATE)
        delay = backoff_delay(h.attempts, self.rand(), self.backoff_initial, maximum)
        if valid:
            delay = min(delay, h.issued.not_after - now)
        h.next_attempt = now + delay
        h.attempts += 1
        self.renewal_results.labels("failed").inc()
        log.warning("certificate request failed; " + ("keeping the current certificate" if valid else
                                                      "no valid certificate: mesh traffic for it is refused"),
                    extra={"identity": h.identity.uri, "error": h.last_error, "retry_at": _iso(h.next_attempt)})

    async def run(self, state=None) -> None:
        """Renew forever (cancel to stop); with ``state`` (AgentState) follow its snapshot:
        ``sync`` runs inside ``state.apply``, so identities come and go with the snapshot."""
        pending: set[asyncio.Task] = set()
        if state is not None:
            state.subscribe(self.sync)
            if state.snapshot is not self._synced:
                self.sync(state.snapshot)
        try:
            while True:
                self._wake.clear()
                # requests run as tasks: a slow CA never delays following the snapshot
                pending = {t for t in pending if not t.done()} | set(self._start_due())
                await self._sleep_until_due()
        finally:
            for t in pending:
                t.cancel()

    async def _sleep_until_due(self) -> None:
        """Until the next identity is due, a request ends, or the snapshot changes (``_wake``)."""
        due = self.next_due()
        wait = None if due is None else max(0.0, due - self.clock())
        try:
            await asyncio.wait_for(self._wake.wait(), wait)
        except TimeoutError:
            pass

    # ------------------------------------------------------------------ views
    def readiness(self) -> tuple[bool, str]:
        """(ok, reason): ok when every local identity has a valid certificate."""
        now = self.clock()
        problems = []
        for h in sorted(self._held.values(), key=lambda h: h.identity.uri):
            if h.issued is None:
                problems.append(f"no certificate yet for {h.identity}" + (f" ({h.last_error})" if h.last_error else ""))
            elif now >= h.issued.not_after:
                problems.append(f"certificate for {h.identity} expired at {_iso(h.issued.not_after)}; its mesh "
                                f"traffic is refused" + (f" ({h.last_error})" if h.last_error else ""))
        return (not problems, "; ".join(problems) or "certificates valid")

    def trust_bundle_pem(self) -> str:
        """The newest trust bundle the CA returned (all roots during a rotation); '' before any."""
        newest = max((h.issued for h in self._held.values() if h.issued), key=lambda i: i.received, default=None)
        return newest.bundle_pem if newest else ""

    def status(self) -> list[dict]:
        """/certs: identity, serial, validity, next renewal, state; never key material."""
        now = self.clock()
        out = []
        for h in sorted(self._held.values(), key=lambda h: h.identity.uri):
            i = h.issued
            if i is None:
                st = "pending"
            elif now >= i.not_after:
                st = "expired"
            else:
                st = "renewing" if h.attempts else "valid"
            out.append({
                "identity": h.identity.uri, "state": st,
                "serial": i.serial if i else None,
                "not_before": _iso(i.not_before) if i else None,
                "not_after": _iso(i.not_after) if i else None,
                "expires_in_seconds": round(i.not_after - now, 1) if i else None,
                "next_renewal": _iso(h.next_attempt),
                "issuer": i.chain[0].issuer.rfc4514_string() if i else None,
                "renewals": h.renewals, "failed_attempts": h.attempts,
                "last_error": h.last_error or None,
                "cert_file": str(h.directory / "cert-chain.pem") if i else None,
            })
        return out


def _describe_error(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):  # grpc.aio.AioRpcError
        return f"{code().name}: {details()}"
    return str(exc) or type(exc).__name__


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
