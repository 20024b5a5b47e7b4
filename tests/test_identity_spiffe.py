"""SPIFFE IDs and the mesh-leaf checks (nodeagent/identity/spiffe.py): every way a peer
certificate can be wrong is refused with a message naming the problem."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeagent.identity import (IdentityError, leaf_identity, leaf_identity_der, parse_spiffe_id, spiffe_id,
                                verify_chain)

TD = "cluster.local"
NOW = dt.datetime.now(dt.timezone.utc)


def make_cert(*, issuer=None, issuer_key=None, ca=False, uris=("spiffe://cluster.local/ns/default/sa/web",),
              eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH), san=True,
              not_before=NOW - dt.timedelta(minutes=5), not_after=NOW + dt.timedelta(hours=1), cn="x"):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san and uris is not None:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]
                                                        or [x509.DNSName("example.com")]), critical=False)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256()), key


def root(cn="root"):
    return make_cert(ca=True, uris=None, eku=None, cn=cn)


# ------------------------------------------------------------------ IDs
def test_spiffe_id_round_trip():
    ident = spiffe_id(TD, "default", "web")
    assert ident.uri == "spiffe://cluster.local/ns/default/sa/web" == str(ident)
    assert parse_spiffe_id(ident.uri) == ident


@pytest.mark.parametrize("uri,message", [
    ("https://cluster.local/ns/a/sa/b", "is not a SPIFFE ID"),
    ("spiffe://cluster.local/a/b", "path must be /ns/<namespace>/sa/<account>"),
    ("spiffe://cluster.local/ns/a/sa/b/extra", "path must be"),
    ("spiffe://Cluster.Local/ns/a/sa/b", "trust domain 'Cluster.Local'"),
    ("spiffe://cluster.local/ns/A_B/sa/b", "namespace 'A_B' is not a valid Kubernetes name"),
    ("spiffe://cluster.local/ns/a/sa/", "service account '' is not a valid Kubernetes name"),
])
def test_bad_spiffe_ids(uri, message):
    with pytest.raises(IdentityError, match=message):
        parse_spiffe_id(uri)


# ------------------------------------------------------------------ leaves
def test_good_leaf():
    r, rk = root()
    leaf, _ = make_cert(issuer=r, issuer_key=rk)
    assert leaf_identity(leaf, TD) == spiffe_id(TD, "default", "web")
    assert leaf_identity_der(leaf.public_bytes(serialization.Encoding.DER), TD).service_account == "web"


@pytest.mark.parametrize("kw,message", [
    ({"ca": True}, "is a CA certificate"),
    ({"san": False}, "has no subjectAltName"),
    ({"uris": ()}, "exactly one URI SAN, it has 0"),
    ({"uris": ("spiffe://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/c/sa/d")},
     "exactly one URI SAN, it has 2"),
    ({"uris": ("spiffe://other.domain/ns/default/sa/web",)}, "from trust domain 'other.domain'"),
    ({"eku": (ExtendedKeyUsageOID.SERVER_AUTH,)}, "does not allow TLS client and server auth"),
])
def test_bad_leaves(kw, message):
    cert, _ = make_cert(**kw)
    with pytest.raises(IdentityError, match=message):
        leaf_identity(cert, TD)


def test_der_input_errors():
    with pytest.raises(IdentityError, match="presented no certificate"):
        leaf_identity_der(b"", TD)
    with pytest.raises(IdentityError, match="cannot be parsed"):
        leaf_identity_der(b"\x30\x03junk", TD)


# ------------------------------------------------------------------ chains
def test_chain_through_an_intermediate():
    r, rk = root()
    inter, ik = make_cert(issuer=r, issuer_key=rk, ca=True, uris=None, eku=None, cn="inter")
    leaf, _ = make_cert(issuer=inter, issuer_key=ik)
    verify_chain([leaf, inter], [r], NOW.timestamp())
    other, _ = root("other")
    verify_chain([leaf, inter], [other, r], NOW.timestamp())  # any root of the bundle


def test_chain_errors():
    r, rk = root()
    leaf, _ = make_cert(issuer=r, issuer_key=rk)
    now = NOW.timestamp()
    with pytest.raises(IdentityError, match="chain is empty"):
        verify_chain([], [r], now)
    with pytest.raises(IdentityError, match="holds no root"):
        verify_chain([leaf], [], now)
    stranger, _ = root("stranger")
    with pytest.raises(IdentityError, match="does not chain to any root"):
        verify_chain([leaf], [stranger], now)
    with pytest.raises(IdentityError, match="is not valid now"):
        verify_chain([leaf], [r], now + 7200)
    # same subject as the root but signed by another key: the name matches, the signature not
    impostor, _ = root("root")
    with pytest.raises(IdentityError, match="does not chain to any root"):
        verify_chain([leaf], [impostor], now)
    # a leaf (CA:FALSE) cannot issue
    fake_inter, fk = make_cert(issuer=r, issuer_key=rk, cn="not-a-ca")
    child, _ = make_cert(issuer=fake_inter, issuer_key=fk)
    with pytest.raises(IdentityError, match="is not a CA"):
        verify_chain([child, fake_inter], [r], now)
    # a broken link in the middle
    inter, _ik = make_cert(issuer=r, issuer_key=rk, ca=True, uris=None, eku=None, cn="inter")
    with pytest.raises(IdentityError, match="is not signed by"):
        verify_chain([leaf, inter], [r], now)
