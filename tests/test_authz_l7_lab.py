"""Request-level AuthorizationPolicy and RequestAuthentication (JWT) through the agents,
over both capture backends.

Policies select the `pod-1` pods (node1/pod-1 and node2/pod-1); clients are the other
pods, all `default/testapp`. Cross-node requests (node1/pod-2 -> node2/pod-1) are parsed
and judged by node2's inbound side, on the tunnel stream; same-node ones (node1/pod-2 ->
node1/pod-1) by node1's outbound side, as the inbound side would. A JWKS server with its
own CA runs in node2's namespace (where node2's agent fetches its keys).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
import sys
import time

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from meshlab import mesh, naming
from meshlab.lab import Lab
from tests.conftest import require_root, unique_lab_name, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

CLIENT = "node1/pod-2"
CROSS = f"http://{naming.pod_ip(2, 1)}:8080"       # node2/pod-1, policy-selected
SAME = f"http://{naming.pod_ip(1, 1)}:8080"        # node1/pod-1, policy-selected
UNSELECTED = f"http://{naming.pod_ip(2, 2)}:8080"  # node2/pod-2: no policy
POLICY_FILE = "l7.yaml"
SELECT_POD_1 = {"matchLabels": {"pod": "pod-1"}}

ISS_INLINE = "https://inline.example.com"
ISS_REMOTE = "https://remote.example.com"
JWKS_PORT = 18443
JWKS_URI = f"https://localhost:{JWKS_PORT}/jwks.json"
INLINE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
REMOTE_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)

_JWKS_SERVER = r"""
import http.server, ssl, sys, functools
directory, port, cert, key = sys.argv[1:5]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


def _jwk(private, kid: str) -> dict:
    public = private.public_key()
    text = RSAAlgorithm.to_jwk(public) if isinstance(public, rsa.RSAPublicKey) else ECAlgorithm.to_jwk(public)
    return {**json.loads(text), "kid": kid}


def _self_signed(directory) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "jwks-cert.pem", directory / "jwks-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def token(private=INLINE_KEY, iss=ISS_INLINE, kid="inline", alg="RS256", **claims) -> str:
    now = int(time.time())
    body = {"iss": iss, "sub": "alice", "aud": "shop", "exp": now + 600, "iat": now - 5, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, private, algorithm=alg,
                      headers={"kid": kid})


@pytest.fixture(scope="module", params=["iptables", "ebpf"])
def l7_lab(request, tmp_path_factory):
    require_root("the request-level authorization lab tests")
    pki = tmp_path_factory.mktemp("jwks")
    cert, key = _self_signed(pki)
    site = pki / "site"
    site.mkdir()
    (site / "jwks.json").write_text(json.dumps({"keys": [_jwk(REMOTE_KEY, "remote")]}))
    lab = Lab(unique_lab_name())
    lab.jwks_ca_file = cert
    lab.jwks_refresh = "2s"
    server = None
    try:
        lab.up(2, 2, capture=request.param)
        server = lab.spawn(lab.target("node2"), [sys.executable, "-c", _JWKS_SERVER, str(site), str(JWKS_PORT),
                                                  cert, key], "jwks-server")
        lab.jwks_server = server
        wait_for(lambda: status(lab, CLIENT, f"{CROSS}/") == "200", timeout=30, what="mesh traffic")
        yield lab
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(10)
        lab.down()


def curl(lab: Lab, src: str, url: str, *args: str) -> subprocess.CompletedProcess:
    return lab.run(src, ["curl", "-sS", "--path-as-is", "--max-time", "3", "-w", "\n%{http_code}", *args, url])


def status(lab: Lab, src: str, url: str, *args: str) -> str:
    return curl(lab, src, url, *args).stdout.rsplit("\n", 1)[-1]


def body_and_status(lab: Lab, src: str, url: str, *args: str) -> tuple[str, str]:
    out = curl(lab, src, url, *args).stdout
    body, _, code = out.rpartition("\n")
    return body, code


def set_config(lab: Lab, *docs: tuple[str, str, dict]) -> None:
    if not docs:
        (mesh.cp_config_dir(lab) / POLICY_FILE).unlink(missing_ok=True)
        return
    mesh.write_config(lab, POLICY_FILE, [{"apiVersion": "hostmesh.io/v1alpha1", "kind": kind,
                                          "metadata": {"name": name, "namespace": "default"}, "spec": spec}
                                         for kind, name, spec in docs])


def decisions(lab: Lab, node: str) -> str:
    metrics = mesh.admin_get(lab, node, "/stats/prometheus").stdout
    return "\n".join(line for line in metrics.splitlines() if line.startswith("hostmesh_agent_authz_decisions_total"))


@pytest.fixture
def clean(l7_lab):
    yield l7_lab
    set_config(l7_lab)
    wait_for(lambda: status(l7_lab, CLIENT, f"{CROSS}/admin") == "200"
             and status(l7_lab, CLIENT, f"{SAME}/admin") == "200", what="the policies to be gone")


PUBLIC_GET = ("AuthorizationPolicy", "public-get", {
    "selector": SELECT_POD_1,
    "rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/public/*"]}}]}]})


@pytest.mark.parametrize("target", [CROSS, SAME], ids=["cross-node", "same-node"])
def test_allow_get_public_refuses_post_admin_and_traversals(clean, target):
    lab = clean
    set_config(lab, PUBLIC_GET)
    wait_for(lambda: status(lab, CLIENT, f"{target}/admin") == "403", what="the L7 policy to reach the agents")
    body, code = body_and_status(lab, CLIENT, f"{target}/public/a")
    assert code == "200" and json.loads(body)["path"] == "/public/a"
    body, code = body_and_status(lab, CLIENT, f"{target}/public/a/./b/../c")
    assert code == "200" and json.loads(body)["path"] == "/public/a/c"  # the pod gets the normalized path
    body, code = body_and_status(lab, CLIENT, f"{target}/public/a", "-X", "POST", "-d", "x=1")
    assert (code, body) == ("403", "RBAC: access denied")
    for path in ("/admin", "/public/../admin", "/public/%2e%2e/admin", "/public/%2E%2e/admin", "/public/./../admin",
                 "//admin", "/PUBLIC/a"):
        assert status(lab, CLIENT, f"{target}{path}") == "403", path
    assert status(lab, CLIENT, f"{target}/public/a%2Fb") == "400"   # MeshConfig default: REJECT
    assert status(lab, CLIENT, f"{target}/public/a", "--http2-prior-knowledge") == "200"
    assert status(lab, CLIENT, f"{target}/admin", "--http2-prior-knowledge") == "403"
    assert status(lab, CLIENT, f"{UNSELECTED}/admin") == "200"       # the policy selects pod-1 only
    node = "node2" if target == CROSS else "node1"
    assert 'policy="default/public-get",result="deny"' in decisions(lab, node)


def test_service_vip_requests_are_checked_at_whichever_endpoint_serves_them(clean):
    """Through the outbound L7 driver: a same-node endpoint is checked by node1's connector
    side, a cross-node one by node2's inbound side on the tunnel stream."""
    lab = clean
    set_config(lab, ("AuthorizationPolicy", "ns-public-get", {
        "rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/public/*"]}}]}]}))
    vip = f"http://{mesh.DEFAULT_SERVICE_VIP}"
    wait_for(lambda: all(status(lab, CLIENT, f"{vip}/admin") == "403" for _ in range(8)), what="the policy")
    pods = set()
    for _ in range(12):
        body, code = body_and_status(lab, CLIENT, f"{vip}/public/x")
        assert code == "200", body
        pods.add((json.loads(body)["node"], json.loads(body)["pod"]))
        assert status(lab, CLIENT, f"{vip}/public/../admin") == "403"
    assert {node for node, _ in pods} == {"node1", "node2"}, pods


def test_non_http_to_a_workload_with_l7_rules_is_refused(clean):
    """ALLOW rules on HTTP attributes never match a TCP connection (Istio's TCP semantics)."""
    lab = clean
    set_config(lab, PUBLIC_GET)
    wait_for(lambda: status(lab, CLIENT, f"{CROSS}/admin") == "403", what="the L7 policy")
    probe = ("import socket\ns = socket.create_connection((%r, 8080), timeout=5)\n"
             "s.sendall(b'\\x00\\x01 not http at all\\r\\n\\r\\n')\n"
             "try:\n    print(repr(s.recv(100)))\nexcept (ConnectionResetError, TimeoutError) as e:\n"
             "    print(type(e).__name__)\n")
    for ip in (naming.pod_ip(2, 1), naming.pod_ip(1, 1)):
        out = lab.run(CLIENT, ["python3", "-c", probe % ip], timeout=20).stdout.strip()
        assert out in ("b''", "ConnectionResetError"), (ip, out)


def test_a_policy_change_applies_to_an_open_keep_alive_connection(clean, tmp_path):
    lab = clean
    go = tmp_path / "go"
    script = ("import http.client, os, sys, time\n"
              f"c = http.client.HTTPConnection({naming.pod_ip(2, 1)!r}, 8080, timeout=5)\n"
              "c.request('GET', '/public/a'); r = c.getresponse(); r.read(); sock = id(c.sock)\n"
              "print(r.status, flush=True)\n"
              f"while not os.path.exists({str(go)!r}): time.sleep(0.1)\n"
              "c.request('GET', '/public/a'); r = c.getresponse(); r.read()\n"
              "print(r.status, id(c.sock) == sock, flush=True)\n")
    set_config(lab, PUBLIC_GET)
    wait_for(lambda: status(lab, CLIENT, f"{CROSS}/admin") == "403", what="the L7 policy")
    proc = subprocess.Popen(lab.exec_argv(lab.target(CLIENT), ["python3", "-c", script]), stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "200"
        set_config(lab, PUBLIC_GET, ("AuthorizationPolicy", "deny-public", {
            "selector": SELECT_POD_1, "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": ["/public/*"]}}]}]}))
        wait_for(lambda: status(lab, CLIENT, f"{CROSS}/public/a") == "403", what="the DENY")
        go.touch()
        assert proc.stdout.readline().split() == ["403", "True"]  # same connection, next request denied
    finally:
        proc.kill()
        proc.wait(10)


def _authn(*rules: dict) -> tuple[str, str, dict]:
    return ("RequestAuthentication", "jwt", {"selector": SELECT_POD_1, "jwtRules": list(rules)})


INLINE_RULE = {"issuer": ISS_INLINE, "audiences": ["shop"],
               "jwks": json.dumps({"keys": [_jwk(INLINE_KEY, "inline")]})}
REMOTE_RULE = {"issuer": ISS_REMOTE, "jwksUri": JWKS_URI, "audiences": ["shop"]}
REQUIRE_JWT = ("AuthorizationPolicy", "require-jwt", {
    "selector": SELECT_POD_1, "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]})


def bearer(tok: str) -> tuple[str, str]:
    return "-H", f"Authorization: Bearer {tok}"


def test_jwt_valid_passes_invalid_is_401_missing_is_403_when_required(clean):
    lab = clean
    set_config(lab, _authn(INLINE_RULE))
    wait_for(lambda: status(lab, CLIENT, f"{CROSS}/", *bearer("garbage")) == "401", what="the RequestAuthentication")
    for target in (CROSS, SAME):
        body, code = body_and_status(lab, CLIENT, f"{target}/x", *bearer(token()))
        assert code == "200" and "authorization" not in json.loads(body)["headers"]  # not forwarded
        assert status(lab, CLIENT, f"{target}/x") == "200"  # no token, no requirement: passes
        forged_none = jwt.encode({"iss": ISS_INLINE, "sub": "alice", "aud": "shop"}, None, algorithm="none")
        for bad in (token(exp=int(time.time()) - 3600), token(aud="billing"), token(iss="https://evil.example.com"),
                    token(OTHER_KEY), forged_none):
            r = curl(lab, CLIENT, f"{target}/x", *bearer(bad), "-D", "-")
            assert r.stdout.rsplit("\n", 1)[-1] == "401", (target, bad[:20], r.stdout)
            assert "www-authenticate: bearer realm=" in r.stdout.lower(), r.stdout
    set_config(lab, _authn(INLINE_RULE), REQUIRE_JWT)
    wait_for(lambda: status(lab, CLIENT, f"{CROSS}/x") == "403", what="requestPrincipals required")
    for target in (CROSS, SAME):
        body, code = body_and_status(lab, CLIENT, f"{target}/x")
        assert (code, body) == ("403", "RBAC: access denied")
        assert status(lab, CLIENT, f"{target}/x", *bearer(token())) == "200"
        assert status(lab, CLIENT, f"{target}/x", *bearer(token(exp=1))) == "401"


def test_jwks_uri_keys_are_fetched_and_kept_when_the_server_goes_away(clean):
    lab = clean
    set_config(lab, _authn(REMOTE_RULE), REQUIRE_JWT)
    remote = token(REMOTE_KEY, ISS_REMOTE, "remote", "ES256")
    wait_for(lambda: status(lab, CLIENT, f"{CROSS}/x") == "403", what="the policies to reach node2")

    def jwks() -> list:
        return json.loads(mesh.admin_get(lab, "node2", "/config_dump").stdout)["jwks"]
    try:
        wait_for(lambda: status(lab, CLIENT, f"{CROSS}/x", *bearer(remote)) == "200", timeout=30,
                 what="node2 to fetch the JWKS")
    except pytest.fail.Exception as exc:
        pytest.fail(f"{exc}: {jwks()}")
    assert jwks()[0]["uri"] == JWKS_URI and jwks()[0]["keys"] == ["remote"]
    lab.jwks_server.kill()
    lab.jwks_server.wait(10)

    def failed_fetches() -> float:
        for line in mesh.admin_get(lab, "node2", "/stats/prometheus").stdout.splitlines():
            if line.startswith('hostmesh_agent_jwks_fetches_total{result="network_error"}'):
                return float(line.split()[-1])
        return 0.0
    wait_for(lambda: failed_fetches() > 0, timeout=30, what="a failed JWKS refresh")
    body, code = body_and_status(lab, CLIENT, f"{CROSS}/x", *bearer(remote))
    assert code == "200", (body, jwks())  # last-known-good keys
    assert jwks()[0]["consecutive_failures"] >= 1
    assert status(lab, CLIENT, f"{CROSS}/x", *bearer(token(OTHER_KEY, ISS_REMOTE, "remote", "RS256"))) == "401"
