"""The mesh CA: root generation and loading, the leaf profile, intermediates, CSR checks,
key permissions, and root rotation with both roots trusted during the overlap."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import tempfile
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane import ca
from controlplane.ca import CAError, CertificateAuthority, CSRRejected
from nodeagent.identity.manager import build_contexts
from nodeagent.identity.spiffe import leaf_identity, spiffe_id, verify_chain

URI = "spiffe://cluster.local/ns/default/sa/web"


def csr_for(key=None, uri: str | None = None) -> tuple[str, object]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uri:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode(), key


def chain_of(issued: ca.Issued) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(issued.chain_pem.encode())


@pytest.fixture
def authority(tmp_path):
    return CertificateAuthority(tmp_path / "ca")


# ------------------------------------------------------------------ root
def test_generated_root_is_private_and_reloads(tmp_path):
    d = tmp_path / "ca"
    first = CertificateAuthority(d)
    assert os.stat(d / ca.CA_KEY).st_mode & 0o777 == 0o600
    assert os.stat(d).st_mode & 0o777 == 0o700
    again = CertificateAuthority(d)
    assert again.signer.root == first.signer.root  # loaded, not regenerated
    root = first.signer.root
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(root.public_key().curve, ec.SECP256R1)


def test_key_readable_by_others_is_refused(tmp_path):
    d = tmp_path / "ca"
    CertificateAuthority(d)
    os.chmod(d / ca.CA_KEY, 0o644)
    with pytest.raises(CAError, match=r"readable by group or others \(mode 0644\); run chmod 600"):
        CertificateAuthority(d)


def test_unreadable_or_mismatched_files_are_named(tmp_path):
    d = tmp_path / "ca"
    CertificateAuthority(d)
    other = tmp_path / "other"
    CertificateAuthority(other)
    shutil.copy(other / ca.CA_KEY, d / ca.CA_KEY)
    with pytest.raises(CAError, match="ca-key.pem does not belong to .*ca-cert.pem"):
        CertificateAuthority(d)
    (d / ca.CA_CERT).write_text("not a certificate")
    with pytest.raises(CAError, match="ca-cert.pem: not a PEM certificate file"):
        CertificateAuthority(d)
    (d / ca.CA_KEY).unlink()
    shutil.copy(other / ca.CA_CERT, d / ca.CA_CERT)
    with pytest.raises(CAError, match="cannot read the CA key"):
        CertificateAuthority(d)


def test_directory_without_a_signing_cert_is_refused_when_not_created(tmp_path):
    with pytest.raises(CAError, match="no ca-cert.pem"):
        CertificateAuthority(tmp_path, create=False)


# ------------------------------------------------------------------ leaves
def test_leaf_profile(authority):
    pem_csr, key = csr_for(uri="spiffe://evil.example/ns/kube-system/sa/admin")
    issued = authority.sign_workload(pem_csr, URI, ttl=3600)
    leaf = chain_of(issued)[0]
    # exactly one URI SAN, chosen by the CA (the CSR's is ignored)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [URI]
    assert len(list(san.value)) == 1 and san.critical  # empty subject -> critical SAN
    assert leaf_identity(leaf, "cluster.local") == spiffe_id("cluster.local", "default", "web")
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(leaf.public_key().curve, ec.SECP256R1)
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = authority.signer.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    assert aki.key_identifier == root_ski.digest
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == dt.timedelta(seconds=3600 + ca.BACKDATE)  # backdated for clock skew
    verify_chain(chain_of(issued), list(authority.roots), authority.clock())


def test_serials_are_random_and_distinct(authority):
    serials = {authority.sign_workload(csr_for()[0], URI, 3600).serial for _ in range(5)}
    assert len(serials) == 5 and all(s.bit_length() > 64 for s in serials)


def test_ttl_has_a_floor_and_never_outlives_the_issuer(tmp_path):
    d = tmp_path / "ca"
    ca.generate_root(d, ttl=7200)
    authority = CertificateAuthority(d)
    short = authority.sign_workload(csr_for()[0], URI, ttl=1)
    assert short.not_after - short.not_before == pytest.approx(ca.MIN_LEAF_TTL + ca.BACKDATE, abs=2)
    long = authority.sign_workload(csr_for()[0], URI, ttl=86400 * 30)
    assert long.not_after <= authority.signer.not_after


def test_expired_signing_ca_is_refused(tmp_path):
    d = tmp_path / "ca"
    ca.generate_root(d, ttl=600, now=1_000_000.0)
    with pytest.raises(CAError, match="the signing CA expired"):
        CertificateAuthority(d)


@pytest.mark.parametrize("make,message", [
    (lambda: "garbage", "not a PEM certificate request"),
    (lambda: "", "the CSR is empty"),
    (lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
     "not a PEM certificate request"),
    (lambda: csr_for(rsa.generate_private_key(public_exponent=65537, key_size=2048))[0],
     "the CSR's key is RSA; workload keys must be ECDSA P-256"),
    (lambda: csr_for(ec.generate_private_key(ec.SECP384R1()))[0], "on curve secp384r1"),
    (lambda: _tampered_csr(), "signature does not verify"),
    (lambda: "x" * (ca.MAX_CSR_BYTES + 1), "more than the"),
])
def test_bad_csrs_are_rejected(authority, make, message):
    with pytest.raises(CSRRejected, match=message):
        authority.sign_workload(make(), URI, 3600)


def _tampered_csr() -> str:
    """A CSR whose key was swapped after signing (the signature no longer verifies)."""
    good, _ = csr_for()
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    csr = x509.load_pem_x509_csr(good.encode())
    der = csr.public_bytes(serialization.Encoding.DER)
    old = csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    new = other.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    tampered = x509.load_der_x509_csr(der.replace(old, new))
    return tampered.public_bytes(serialization.Encoding.PEM).decode()


# ------------------------------------------------------------------ intermediate
def make_intermediate(tmp_path) -> tuple:
    """An operator's root (kept offline) and an intermediate CA dir signed by it."""
    root_dir = tmp_path / "offline-root"
    root = ca.generate_root(root_dir, common_name="operator root")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    inter = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh intermediate")]))
             .issuer_name(root.cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .sign(root.key, hashes.SHA256()))
    d = tmp_path / "cacerts"
    d.mkdir()
    (d / ca.CA_CERT).write_text(ca.pem(inter))
    fd = os.open(d / ca.CA_KEY, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, ca.key_pem(key))
    os.close(fd)
    (d / ca.ROOT_CERT).write_text(ca.pem(root.cert))
    (d / ca.CERT_CHAIN).write_text(ca.pem(inter, root.cert))  # Istio's cert-chain.pem shape
    return d, root, inter


def test_intermediate_chain_verifies_against_the_root(tmp_path):
    d, root, inter = make_intermediate(tmp_path)
    authority = CertificateAuthority(d)
    assert [c.subject for c in authority.roots] == [root.cert.subject]
    chain = chain_of(authority.sign_workload(csr_for()[0], URI, 3600))
    assert [c.issuer for c in chain] == [inter.subject, root.cert.subject]
    verify_chain(chain, [root.cert], authority.clock())
    # and OpenSSL agrees: a handshake with the leaf chain verifies against the root only
    handshake_with(authority, authority)


def test_intermediate_not_signed_by_the_root_is_refused(tmp_path):
    d, _root, _inter = make_intermediate(tmp_path)
    stranger = ca.generate_root(tmp_path / "stranger")
    (d / ca.ROOT_CERT).write_text(ca.pem(stranger.cert))
    (d / ca.CERT_CHAIN).unlink()
    with pytest.raises(CAError, match="is not signed by .*chain .* is broken"):
        CertificateAuthority(d)


# ------------------------------------------------------------------ control-plane certificate
def test_serving_certificate_names(authority):
    chain, key, not_after = authority.issue_server(["198.18.0.2", "cp.mesh.example"], 86400)
    leaf = x509.load_pem_x509_certificates(chain.encode())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["198.18.0.2"]
    assert san.get_values_for_type(x509.DNSName) == ["cp.mesh.example"]
    assert b"PRIVATE KEY" in key
    with pytest.raises(CAError, match="at least one DNS name or IP"):
        authority.issue_server([], 60)


# ------------------------------------------------------------------ rotation
def leaf_files(authority: CertificateAuthority, tmp_path, name: str, uri: str = URI) -> tuple[str, str]:
    pem_csr, key = csr_for()
    issued = authority.sign_workload(pem_csr, uri, 3600)
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_text(issued.chain_pem)
    key_file.write_bytes(ca.key_pem(key))
    return str(cert_file), str(key_file)


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bytes:
    """A real TLS handshake on loopback; returns the server's view of the client certificate (DER)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    seen: dict = {}

    def serve():
        conn, _ = lsock.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen["error"] = exc

    t = threading.Thread(target=serve)
    t.start()
    try:
        with socket.create_connection(lsock.getsockname(), timeout=10) as raw:
            with client_ctx.wrap_socket(raw) as tls:
                assert tls.recv(2) == b"ok"
    finally:
        t.join(10)
        lsock.close()
    if "error" in seen:
        raise seen["error"]
    return seen["peer"]


def contexts(cert_file: str, key_file: str, bundle: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return build_contexts(Path(cert_file), Path(key_file), bundle)


def handshake_with(server_ca: CertificateAuthority, client_ca: CertificateAuthority) -> None:
    with tempfile.TemporaryDirectory() as t:
        tdir = Path(t)
        s_cert, s_key = leaf_files(server_ca, tdir, "server")
        c_cert, c_key = leaf_files(client_ca, tdir, "client", "spiffe://cluster.local/ns/default/sa/client")
        server, _ = contexts(s_cert, s_key, server_ca.trust_bundle_pem)
        _, client = contexts(c_cert, c_key, client_ca.trust_bundle_pem)
        peer = handshake(server, client)
        assert leaf_identity(x509.load_der_x509_certificate(peer), "cluster.local").service_account == "client"


def test_root_rotation_keeps_handshakes_working(tmp_path):
    d = tmp_path / "ca"
    old = CertificateAuthority(d)
    old_root = old.signer.root
    old_leaf = leaf_files(old, tmp_path, "old")

    assert "new root written" in ca.rotate_prepare(d)
    assert old.reload_if_changed()
    assert len(old.roots) == 2 and old.signer.root == old_root  # both trusted, the old one still signs
    assert not old.reload_if_changed()

    assert "the new CA signs" in ca.rotate_activate(d)
    new = CertificateAuthority(d)
    assert new.signer.root != old_root and old_root in new.roots and len(new.roots) == 2
    new_leaf = leaf_files(new, tmp_path, "new", "spiffe://cluster.local/ns/default/sa/client")
    bundle = new.trust_bundle_pem  # what agents hold during the overlap

    # old-root leaf <-> new-root leaf, both directions, with the overlap bundle
    server, _ = contexts(*old_leaf, bundle)
    _, client = contexts(*new_leaf, bundle)
    handshake(server, client)
    server, _ = contexts(*new_leaf, bundle)
    _, client = contexts(*old_leaf, bundle)
    handshake(server, client)

    assert "complete" in ca.rotate_finish(d)
    final = CertificateAuthority(d)
    assert list(final.roots) == [new.signer.root]
    # after finish an old-root leaf is no longer accepted
    server, _ = contexts(*new_leaf, final.trust_bundle_pem)
    _, client = contexts(*old_leaf, final.trust_bundle_pem)
    with pytest.raises(ssl.SSLError):
        handshake(server, client)


def test_rotation_steps_out_of_order_are_refused(tmp_path):
    d = tmp_path / "ca"
    CertificateAuthority(d)
    with pytest.raises(CAError, match="no next CA; run `hostmesh ca rotate prepare` first"):
        ca.rotate_activate(d)
    ca.rotate_prepare(d)
    assert "already holds the next CA" in ca.rotate_prepare(d)
    ca.rotate_activate(d)
    with pytest.raises(CAError, match="previous rotation is not finished"):
        ca.rotate_prepare(d)
    assert "nothing to finish" not in ca.rotate_finish(d)
    assert "nothing to finish" in ca.rotate_finish(d)


def test_broken_rotation_keeps_the_loaded_ca(tmp_path):
    d = tmp_path / "ca"
    authority = CertificateAuthority(d)
    signer = authority.signer
    (d / ca.NEXT_DIR).mkdir()
    (d / ca.NEXT_DIR / ca.ROOT_CERT).write_text("junk")
    with pytest.raises(CAError):
        authority.reload_if_changed()
    assert authority.signer is signer


# ------------------------------------------------------------------ the operator's commands
def test_cli_ca_commands(tmp_path, capsys):
    from hostmesh import cli
    d = tmp_path / "ca"
    CertificateAuthority(d)
    assert cli.main(["ca", "rotate", "prepare", "--ca-dir", str(d)]) == 0
    assert cli.main(["ca", "bundle", "--ca-dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert len(x509.load_pem_x509_certificates(out[out.index("-----BEGIN"):].encode())) == 2
    assert cli.main(["ca", "status", "--ca-dir", str(d), "-o", "json"]) == 0
    assert '"intermediate": false' in capsys.readouterr().out
    assert cli.main(["ca", "rotate", "finish", "--ca-dir", str(d)]) == 0
    assert cli.main(["ca", "rotate", "activate", "--ca-dir", str(tmp_path / "nope")]) == 1
    assert "no next CA" in capsys.readouterr().err


def test_cli_controlplane_needs_security_or_insecure(tmp_path, capsys):
    from hostmesh import cli
    assert cli.main(["controlplane", "--config-dir", str(tmp_path)]) == 1
    assert "--ca-dir and --node-tokens are required" in capsys.readouterr().err
    assert cli.main(["controlplane", "--config-dir", str(tmp_path), "--insecure", "--ca-dir", str(tmp_path)]) == 1
    assert "--insecure serves plaintext" in capsys.readouterr().err
    (tmp_path / "tokens").mkdir()
    bad = tmp_path / "ca"
    CertificateAuthority(bad)
    os.chmod(bad / ca.CA_KEY, 0o640)
    assert cli.main(["controlplane", "--config-dir", str(tmp_path), "--ca-dir", str(bad),
                     "--node-tokens", str(tmp_path / "tokens")]) == 1
    assert "readable by group or others" in capsys.readouterr().err
