"""SPIFFE identities and the checks every mesh peer certificate must pass.

Pure logic on ``cryptography`` objects, no I/O. OpenSSL verifies chains, signatures and
validity windows during the handshake; it knows nothing of SPIFFE, so after a handshake
(and on a certificate the CA just returned) ``leaf_identity`` checks what a mesh leaf must
be: exactly one URI SAN of the form ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>`` in our
trust domain, not a CA, usable for TLS client and server authentication.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from nodeagent.errors import AgentError

DEFAULT_TRUST_DOMAIN = "cluster.local"

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_TRUST_DOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class IdentityError(AgentError):
    """A certificate or SPIFFE ID is not acceptable as a mesh identity; says why."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    """The identity of workloads running as ``namespace/service_account``; validates each part."""
    if not _TRUST_DOMAIN.match(trust_domain or "") or len(trust_domain) > 255:
        raise IdentityError(f"trust domain {trust_domain!r} is not a lowercase DNS name like cluster.local")
    for what, value in (("namespace", namespace), ("service account", service_account)):
        if not _NAME.match(value or "") or len(value) > 253:
            raise IdentityError(f"{what} {value!r} is not a valid Kubernetes name")
    return SpiffeId(trust_domain, namespace, service_account)


def parse_spiffe_id(uri: str) -> SpiffeId:
    """``spiffe://td/ns/<ns>/sa/<sa>`` -> SpiffeId; anything else raises IdentityError."""
    prefix = "spiffe://"
    if not isinstance(uri, str) or not uri.startswith(prefix):
        raise IdentityError(f"{uri!r} is not a SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<account>)")
    td, _, path = uri[len(prefix):].partition("/")
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        raise IdentityError(f"{uri!r} is not a workload SPIFFE ID: the path must be /ns/<namespace>/sa/<account>")
    return spiffe_id(td, parts[1], parts[3])


def leaf_identity(cert: x509.Certificate, trust_domain: str) -> SpiffeId:
    """The SPIFFE ID of a mesh leaf certificate, or IdentityError naming what is wrong."""
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is not None and basic.ca:
        raise IdentityError("peer certificate is a CA certificate (CA:TRUE), not a workload leaf")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("peer certificate has no subjectAltName, so it names no SPIFFE identity") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise IdentityError(f"peer certificate must carry exactly one URI SAN, it has {len(uris)}")
    ident = parse_spiffe_id(uris[0])
    if ident.trust_domain != trust_domain:
        raise IdentityError(f"peer identity {ident.uri} is from trust domain {ident.trust_domain!r}, "
                            f"this mesh trusts {trust_domain!r}")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku):
        raise IdentityError("peer certificate's extended key usage does not allow TLS client and server auth")
    return ident


def leaf_identity_der(der: bytes, trust_domain: str) -> SpiffeId:
    """``leaf_identity`` for the DER bytes ``SSLObject.getpeercert(binary_form=True)`` returns."""
    if not der:
        raise IdentityError("peer presented no certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityError(f"peer certificate cannot be parsed: {exc}") from None
    return leaf_identity(cert, trust_domain)


def verify_chain(chain: list[x509.Certificate], roots: list[x509.Certificate], now: float) -> None:
    """Check that ``chain`` (leaf first, then intermediates) links up to one of ``roots``:
    each certificate signed by the next, every issuer a CA, all valid at ``now``.
    Raises IdentityError naming the broken link. (OpenSSL does the same during handshakes;
    this checks a certificate the CA just returned before the agent installs it.)"""
    if not chain:
        raise IdentityError("the certificate chain is empty")
    if not roots:
        raise IdentityError("the trust bundle holds no root")
    for cert in chain:
        if not cert.not_valid_before_utc.timestamp() <= now < cert.not_valid_after_utc.timestamp():
            raise IdentityError(f"certificate {_describe(cert)} is not valid now (valid "
                                f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                                f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
    for child, parent in zip(chain, chain[1:]):
        _check_issued_by(child, parent)
    last = chain[-1]
    for root in roots:
        if root.subject == last.issuer or root == last:
            try:
                _check_issued_by(last, root)
                return
            except IdentityError:
                continue
    raise IdentityError(f"certificate {_describe(last)} does not chain to any root of the trust bundle "
                        f"(issuer {last.issuer.rfc4514_string() or '(empty)'})")


def _check_issued_by(child: x509.Certificate, parent: x509.Certificate) -> None:
    try:
        basic = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise IdentityError(f"{_describe(parent)} issued {_describe(child)} but is not a CA")
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        raise IdentityError(f"{_describe(child)} is not signed by {_describe(parent)}") from None


def _describe(cert: x509.Certificate) -> str:
    return f"serial {cert.serial_number:x} ({cert.subject.rfc4514_string() or 'no subject'})"
