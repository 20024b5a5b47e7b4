"""The mesh CA: signs workload leaves for authorized identities and the control plane's own
TLS certificate, from a CA directory the operator owns.

CA directory layout (the names Istio's plugged-in ``cacerts`` use):

    ca-cert.pem      the signing certificate (the root itself, or an intermediate)
    ca-key.pem       its private key, mode 0600 (refused when group/other can read it)
    root-cert.pem    the root the signing certificate chains to
    cert-chain.pem   optional: the certificates between ca-cert.pem and the root
    next/            optional: the same files for the CA that will sign next (rotation)
    previous/        optional: root-cert.pem of the CA that signed before (rotation)

An empty or missing directory gets a generated self-signed root (ECDSA P-256, 10 years)
on first start. The trust bundle handed to agents is every root present (current, next,
previous), so during a root rotation a leaf of either root verifies everywhere:

    hostmesh ca rotate prepare --ca-dir DIR   # new root in next/; bundle = old + new
    ... wait one certificate TTL: every agent renews and trusts both roots
    hostmesh ca rotate activate --ca-dir DIR  # new root signs; old root -> previous/
    ... wait one certificate TTL: every leaf of the old root has expired
    hostmesh ca rotate finish --ca-dir DIR    # drop previous/; bundle = new root

The running control plane notices the change (``CertificateAuthority.reload_if_changed``).
Leaves: ECDSA P-256 keys only, exactly one URI SAN chosen by the CA (never by the CSR),
CA:FALSE, digitalSignature, serverAuth+clientAuth, SKI/AKI, a random serial, backdated
``BACKDATE`` for clock skew and never valid beyond the issuer.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.errors import ControlPlaneError
from nodeagent.identity.files import write_private

CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN = "ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"
NEXT_DIR, PREVIOUS_DIR = "next", "previous"
ROOT_TTL = 10 * 365 * 86400.0
BACKDATE = 300.0  # leaves start 5 minutes in the past: peers' clocks are never exactly ours
MIN_LEAF_TTL = 60.0
MAX_CSR_BYTES = 16 * 1024


class CAError(ControlPlaneError):
    """The CA directory or a signing request is not usable; the message says which file or field."""


class CSRRejected(CAError):
    """A certificate signing request the CA will not sign (bad signature, key type, PEM)."""


@dataclass(frozen=True)
class Issued:
    """A signed leaf: ``chain_pem`` is the leaf then every certificate up to (excluding) the root."""

    chain_pem: str
    serial: int
    not_before: float
    not_after: float


@dataclass(frozen=True)
class Signer:
    """One signing CA loaded from a directory: its certificate, key, chain and root."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]  # between cert and root (may be empty)
    root: x509.Certificate

    @property
    def not_after(self) -> float:
        return min(c.not_valid_after_utc.timestamp() for c in (self.cert, *self.chain, self.root))


# ------------------------------------------------------------------ files
def _read_pem_certs(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CAError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CAError(f"{path}: not a PEM certificate file: {exc}") from None
    return certs


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        st = path.stat()
    except OSError as exc:
        raise CAError(f"{path}: cannot read the CA key: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise CAError(f"{path}: the CA key is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                      f"run chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CAError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{path}: the CA key must be an EC key, got {type(key).__name__}")
    return key


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def load_signer(d: Path) -> Signer:
    """Load and check one CA directory (or next/): key permissions, key matches cert, the
    chain links up to root-cert.pem, every CA certificate is CA:TRUE."""
    cert_path, key_path, root_path = d / CA_CERT, d / CA_KEY, d / ROOT_CERT
    certs = _read_pem_certs(cert_path)
    if len(certs) != 1:
        raise CAError(f"{cert_path}: must hold exactly one certificate, it holds {len(certs)}")
    cert = certs[0]
    key = _read_key(key_path)
    if not _same_key(cert, key):
        raise CAError(f"{key_path} does not belong to {cert_path} (the public keys differ)")
    roots = _read_pem_certs(root_path)
    if len(roots) != 1:
        raise CAError(f"{root_path}: must hold exactly one root certificate, it holds {len(roots)}")
    root = roots[0]
    chain = tuple(_read_pem_certs(d / CERT_CHAIN)) if (d / CERT_CHAIN).exists() else ()
    chain = tuple(c for c in chain if c != cert and c != root)  # Istio's cert-chain.pem includes both
    for c in (cert, *chain, root):
        if not _is_ca(c):
            raise CAError(f"{d}: certificate {c.subject.rfc4514_string()} is not a CA (BasicConstraints CA:TRUE)")
    links = (cert, *chain, root)
    for child, parent in zip(links, links[1:]):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise CAError(f"{d}: {child.subject.rfc4514_string()} is not signed by "
                          f"{parent.subject.rfc4514_string()}; the chain ca-cert.pem -> cert-chain.pem -> "
                          f"root-cert.pem is broken") from None
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise CAError(f"{root_path}: the root is not self-signed") from None
    return Signer(cert=cert, key=key, chain=chain, root=root)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def generate_root(d: Path, *, common_name: str = "hostmesh root CA", ttl: float = ROOT_TTL,
                  now: float | None = None) -> Signer:
    """A new self-signed ECDSA P-256 root written into ``d`` (mode 0700; key 0600)."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime.fromtimestamp((time.time() if now is None else now) - BACKDATE, dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hostmesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(seconds=ttl))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    write_private(d / CA_KEY, key_pem(key))
    _write_public(d / CA_CERT, pem(cert).encode())
    _write_public(d / ROOT_CERT, pem(cert).encode())
    return Signer(cert=cert, key=key, chain=(), root=cert)


def _dir_is_empty(d: Path) -> bool:
    return not d.exists() or not any(p for p in d.iterdir() if not p.name.startswith("."))


def trust_bundle_roots(ca_dir: Path) -> list[x509.Certificate]:
    """Every trusted root in the CA dir (current, next, previous), deduplicated; no key is read."""
    out: list[x509.Certificate] = []
    for p in (ca_dir / ROOT_CERT, ca_dir / NEXT_DIR / ROOT_CERT, ca_dir / PREVIOUS_DIR / ROOT_CERT):
        if p.exists():
            for c in _read_pem_certs(p):
                if c not in out:
                    out.append(c)
    if not out:
        raise CAError(f"{ca_dir}: no {ROOT_CERT}: the CA directory holds no root")
    return out


# ------------------------------------------------------------------ CSRs and leaves
def check_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    """Parse a CSR and check what the CA needs of it; the SANs it asks for are ignored."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if not data.strip():
        raise CSRRejected("the CSR is empty")
    if len(data) > MAX_CSR_BYTES:
        raise CSRRejected(f"the CSR is {len(data)} bytes, more than the {MAX_CSR_BYTES} allowed")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CSRRejected(f"the CSR is not a PEM certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise CSRRejected("the CSR's signature does not verify (it was not signed by its own key)")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CSRRejected(f"the CSR's key is {_key_kind(key)}; workload keys must be ECDSA P-256")
    if not isinstance(key.curve, ec.SECP256R1):
        raise CSRRejected(f"the CSR's key is on curve {key.curve.name}; workload keys must be ECDSA P-256 "
                          f"(secp256r1)")
    return csr


def _key_kind(key) -> str:
    name = type(key).__name__.lstrip("_")
    for kind in ("RSA", "DSA", "Ed25519", "Ed448", "X25519", "X448"):
        if kind in name:
            return kind
    return name


def _leaf(subject_key, issuer: Signer, *, not_before: float, not_after: float,
          san: x509.SubjectAlternativeName, subject: x509.Name) -> x509.Certificate:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.cert.subject)
            .public_key(subject_key).serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.fromtimestamp(not_before, dt.timezone.utc))
            .not_valid_after(dt.datetime.fromtimestamp(not_after, dt.timezone.utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
            .add_extension(_aki(issuer.cert), critical=False)
            .add_extension(san, critical=not subject)  # RFC 5280: critical when the subject is empty
            .sign(issuer.key, hashes.SHA256()))


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())


# ------------------------------------------------------------------ the CA
class CertificateAuthority:
    """The loaded CA directory: signs leaves, builds the trust bundle, follows rotations."""

    def __init__(self, ca_dir: str | Path, *, clock: Callable[[], float] = time.time,
                 create: bool = True) -> None:
        self.ca_dir = Path(ca_dir)
        self.clock = clock
        if create and _dir_is_empty(self.ca_dir):
            generate_root(self.ca_dir, now=clock())
        self.signer, self.roots = self._load()
        self._fingerprint = self._files_fingerprint()

    def _load(self) -> tuple[Signer, tuple[x509.Certificate, ...]]:
        if not (self.ca_dir / CA_CERT).exists():
            raise CAError(f"{self.ca_dir}: no {CA_CERT}; give an existing CA directory or an empty one "
                          f"(a root is then generated)")
        signer = load_signer(self.ca_dir)
        now = self.clock()
        if signer.not_after <= now:
            raise CAError(f"{self.ca_dir}: the signing CA expired at {_iso(signer.not_after)}")
        next_dir = self.ca_dir / NEXT_DIR
        if next_dir.exists():
            load_signer(next_dir)  # a broken next/ must be reported now, not at activation
        return signer, tuple(trust_bundle_roots(self.ca_dir))

    def _files_fingerprint(self) -> tuple:
        out = []
        for p in (self.ca_dir / CA_CERT, self.ca_dir / CA_KEY, self.ca_dir / ROOT_CERT, self.ca_dir / CERT_CHAIN,
                  self.ca_dir / NEXT_DIR / ROOT_CERT, self.ca_dir / PREVIOUS_DIR / ROOT_CERT):
            try:
                st = p.stat()
                out.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((str(p), None))
        return tuple(out)

    def reload_if_changed(self) -> bool:
        """Re-read the CA dir after a rotation step; True when it changed. A broken dir raises
        CAError and the CA already loaded stays in force."""
        fp = self._files_fingerprint()
        if fp == self._fingerprint:
            return False
        self._fingerprint = fp
        self.signer, self.roots = self._load()
        return True

    @property
    def trust_bundle_pem(self) -> str:
        return pem(*self.roots)

    def _window(self, ttl: float) -> tuple[float, float]:
        now = self.clock()
        not_before = now - BACKDATE
        not_after = min(now + max(ttl, MIN_LEAF_TTL), self.signer.not_after)
        if not_after <= now:
            raise CAError(f"the signing CA expires at {_iso(self.signer.not_after)}; it cannot issue certificates")
        return not_before, not_after

    def _issued(self, cert: x509.Certificate) -> Issued:
        return Issued(chain_pem=pem(cert, self.signer.cert, *self.signer.chain) if self.signer.cert != self.signer.root
                      else pem(cert), serial=cert.serial_number,
                      not_before=cert.not_valid_before_utc.timestamp(), not_after=cert.not_valid_after_utc.timestamp())

    def sign_workload(self, csr_pem: str | bytes, spiffe_uri: str, ttl: float) -> Issued:
        """A leaf for ``spiffe_uri`` (decided by the caller from the authorized identity) on the
        CSR's key. The CSR's own subject and SANs are ignored."""
        csr = check_csr(csr_pem)
        not_before, not_after = self._window(ttl)
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_uri)])
        cert = _leaf(csr.public_key(), self.signer, not_before=not_before, not_after=not_after, san=san,
                     subject=x509.Name([]))
        return self._issued(cert)

    def issue_server(self, names: Iterable[str], ttl: float) -> tuple[str, bytes, float]:
        """The control plane's serving certificate: (chain PEM, key PEM, not_after) for DNS names/IPs."""
        entries: list[x509.GeneralName] = []
        for n in names:
            try:
                entries.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                entries.append(x509.DNSName(n))
        if not entries:
            raise CAError("the control plane's TLS certificate needs at least one DNS name or IP (--tls-san)")
        key = ec.generate_private_key(ec.SECP256R1())
        not_before, not_after = self._window(ttl)
        cert = _leaf(key.public_key(), self.signer, not_before=not_before, not_after=not_after,
                     san=x509.SubjectAlternativeName(entries),
                     subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostmesh control plane")]))
        return self._issued(cert).chain_pem, key_pem(key), not_after

    def status(self) -> dict:
        return {"ca_dir": str(self.ca_dir), "signing": self.signer.cert.subject.rfc4514_string(),
                "signing_not_after": _iso(self.signer.not_after),
                "intermediate": self.signer.cert != self.signer.root,
                "roots": [{"subject": r.subject.rfc4514_string(), "serial": f"{r.serial_number:x}",
                           "not_after": _iso(r.not_valid_after_utc.timestamp())} for r in self.roots]}


# ------------------------------------------------------------------ rotation (operator commands)
def rotate_prepare(ca_dir: str | Path) -> str:
    """Generate the next root into next/ (unless the operator put one there); from now on
    the trust bundle holds both roots."""
    d = Path(ca_dir)
    load_signer(d)
    nxt = d / NEXT_DIR
    if (nxt / CA_CERT).exists():
        load_signer(nxt)
        return f"{nxt} already holds the next CA; it is trusted. Wait one certificate TTL, then `activate`."
    if (d / PREVIOUS_DIR).exists():
        raise CAError(f"{d / PREVIOUS_DIR} exists: the previous rotation is not finished; run `finish` first")
    generate_root(nxt, common_name=f"hostmesh root CA {time.strftime('%Y-%m-%d')}")
    return (f"new root written to {nxt}; agents now trust both roots after their next renewal. "
            f"Wait one certificate TTL, then run `hostmesh ca rotate activate`.")


def rotate_activate(ca_dir: str | Path) -> str:
    """The next CA becomes the signing CA; the old root stays trusted in previous/."""
    d = Path(ca_dir)
    nxt = d / NEXT_DIR
    if not (nxt / CA_CERT).exists():
        raise CAError(f"{nxt}: no next CA; run `hostmesh ca rotate prepare` first")
    load_signer(nxt)
    load_signer(d)
    prev = d / PREVIOUS_DIR
    if prev.exists():
        raise CAError(f"{prev} exists: the previous rotation is not finished; run `finish` first")
    prev.mkdir(mode=0o700)
    shutil.copy2(d / ROOT_CERT, prev / ROOT_CERT)
    for name in (CA_CERT, ROOT_CERT, CERT_CHAIN):
        if (nxt / name).exists():
            os.replace(nxt / name, d / name)
        elif (d / name).exists():
            (d / name).unlink()
    os.replace(nxt / CA_KEY, d / CA_KEY)
    shutil.rmtree(nxt)
    load_signer(d)
    return (f"the new CA signs from now on; the old root stays trusted in {prev}. Wait one certificate TTL "
            f"(until every old leaf expired), then run `hostmesh ca rotate finish`.")


def rotate_finish(ca_dir: str | Path) -> str:
    d = Path(ca_dir)
    prev = d / PREVIOUS_DIR
    if not prev.exists():
        return f"{prev} does not exist: nothing to finish"
    shutil.rmtree(prev)
    return "the old root is no longer trusted; the rotation is complete"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def new_token() -> str:
    """A node bootstrap token: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)
