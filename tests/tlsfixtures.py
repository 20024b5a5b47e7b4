"""A throwaway CA and a ``WorkloadIdentities`` over its files, for tunnel tests and benches.

``TestCA`` makes a P-256 root (optionally an intermediate under it) and leaves with one
SPIFFE URI SAN, plus deliberately bad leaves (other trust domain, expired, wrong SAN, two
URI SANs, CA:TRUE). ``FileIdentities`` implements the proxy's seam
(``nodeagent.identity.WorkloadIdentities``) the way the real certificate manager must:
TLS 1.3 minimum, a certificate required both ways, ``check_hostname`` off (the SPIFFE SAN
is checked by the proxy with ``leaf_identity_der``), None for an identity without a
valid certificate.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeagent.identity import SpiffeId, spiffe_id

TD = "cluster.local"
_EKU = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Issued:
    """A leaf written to disk: ``chain`` is leaf + intermediates (what a peer presents)."""

    chain: Path
    key: Path
    cert: x509.Certificate


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, *, intermediate: bool = False, name: str = "hostmesh test root") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root_key = _key()
        self.root = self._ca_cert(name, self.root_key, self.root_key, None)
        self.issuer_key, self.issuer = self.root_key, self.root
        self.intermediates: list[x509.Certificate] = []
        if intermediate:
            key = _key()
            cert = self._ca_cert(name + " intermediate", key, self.root_key, self.root)
            self.issuer_key, self.issuer = key, cert
            self.intermediates.append(cert)
        self.bundle = self.dir / "roots.pem"
        self.bundle.write_bytes(_pem(self.root))
        self._n = 0

    @classmethod
    def issuing_as(cls, directory: Path, cert_pem: Path, key_pem: Path) -> "TestCA":
        """A TestCA whose leaves are signed by an existing CA (e.g. a lab's mesh CA), so that
        only the leaf's own properties can make a peer refuse it."""
        self = cls.__new__(cls)
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.issuer = self.root = x509.load_pem_x509_certificate(Path(cert_pem).read_bytes())
        self.issuer_key = self.root_key = serialization.load_pem_private_key(Path(key_pem).read_bytes(), None)
        self.intermediates = []
        self.bundle = self.dir / "roots.pem"
        self.bundle.write_bytes(_pem(self.root))
        self._n = 0
        return self

    def _ca_cert(self, cn: str, key, signer_key, signer: x509.Certificate | None) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = _now()
        return (x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(signer.subject if signer is not None else subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(signer_key, hashes.SHA256()))

    def leaf(self, identity: SpiffeId | None = None, *, uris: list[str] | None = None, ca: bool = False,
             not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
             eku=_EKU) -> Issued:
        """A leaf for ``identity`` (or with exactly the given URI SANs)."""
        if uris is None:
            uris = [identity.uri]
        key = _key()
        now = _now()
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([]))
                   .issuer_name(self.issuer.subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or now - dt.timedelta(minutes=5))
                   .not_valid_after(not_after or now + dt.timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                                  critical=True)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=False,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True))
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        cert = builder.sign(self.issuer_key, hashes.SHA256())
        self._n += 1
        chain = self.dir / f"leaf{self._n}.pem"
        keyf = self.dir / f"leaf{self._n}.key"
        chain.write_bytes(_pem(cert) + b"".join(_pem(c) for c in self.intermediates))
        keyf.write_bytes(_key_pem(key))
        keyf.chmod(0o600)
        return Issued(chain, keyf, cert)

    # the deliberately bad leaves the tunnel must refuse
    def bad_leaves(self, ns: str = "apps", sa: str = "client") -> dict[str, Issued]:
        now = _now()
        return {
            "other_trust_domain": self.leaf(uris=[f"spiffe://other.example/ns/{ns}/sa/{sa}"]),
            "expired": self.leaf(spiffe_id(TD, ns, sa), not_before=now - dt.timedelta(hours=3),
                                 not_after=now - dt.timedelta(hours=1)),
            "wrong_san": self.leaf(uris=[f"https://{sa}.{ns}.example/"]),
            "two_uri_sans": self.leaf(uris=[spiffe_id(TD, ns, sa).uri, spiffe_id(TD, ns, "admin").uri]),
            "ca_true": self.leaf(spiffe_id(TD, ns, sa), ca=True),
        }


def server_context_for(issued: Issued, roots: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(roots))
    ctx.load_cert_chain(str(issued.chain), str(issued.key))
    ctx.num_tickets = 0  # the tunnel pools connections instead of resuming sessions
    return ctx


def client_context_for(issued: Issued | None, roots: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the SPIFFE URI SAN is checked after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(roots))
    if issued is not None:
        ctx.load_cert_chain(str(issued.chain), str(issued.key))
    return ctx


class FileIdentities:
    """``WorkloadIdentities`` over files from ``TestCA``; contexts built once per identity."""

    def __init__(self, roots: Path, trust_domain: str = TD) -> None:
        self.roots = roots
        self._td = trust_domain
        self._issued: dict[SpiffeId, Issued] = {}
        self._server: dict[SpiffeId, ssl.SSLContext] = {}
        self._client: dict[SpiffeId, ssl.SSLContext] = {}

    @property
    def trust_domain(self) -> str:
        return self._td

    def add(self, identity: SpiffeId, issued: Issued) -> None:
        """Install (or rotate to) a certificate: new contexts from now on."""
        self._issued[identity] = issued
        self._server.pop(identity, None)
        self._client.pop(identity, None)

    def remove(self, identity: SpiffeId) -> None:
        """As if the certificate expired: the proxy must refuse, not downgrade."""
        self._issued.pop(identity, None)
        self._server.pop(identity, None)
        self._client.pop(identity, None)

    def server_context(self, identity: SpiffeId) -> ssl.SSLContext | None:
        ctx = self._server.get(identity)
        if ctx is None and identity in self._issued:
            ctx = self._server[identity] = server_context_for(self._issued[identity], self.roots)
        return ctx

    def client_context(self, identity: SpiffeId) -> ssl.SSLContext | None:
        ctx = self._client.get(identity)
        if ctx is None and identity in self._issued:
            ctx = self._client[identity] = client_context_for(self._issued[identity], self.roots)
        return ctx
