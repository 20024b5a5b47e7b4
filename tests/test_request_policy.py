"""Request-level AuthorizationPolicy and the per-request gate (path normalization, JWT,
L7 rules): Istio's documented examples, table-driven, no sockets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nodeagent.proxy.authz import Authorizer, AuthzGate, ConnectionAttrs, RequestAttrs
from nodeagent.proxy.jwtauth import RequestAuthn
from nodeagent.proxy.l7.pathnorm import EscapedSlashes
from nodeagent.proxy.request_policy import GateDenial, RequestPolicy, escaped_slashes_of
from nodeagent.state import ConfigObject, NodeSnapshot
from tests.test_authz import FRONT, WEB, conn, policy, snap
from tests.test_jwtauth import ISS, RSA_KEY, RSA_OTHER, jwk_of, jwks_text, sign


def request(method="GET", path="/", host="web.shop:8080", headers=None, c=None, principal=None, claims=None,
            audiences=(), presenter="") -> RequestAttrs:
    return RequestAttrs(c or conn(), method, host, path, headers or {}, principal, claims, audiences, presenter)


def both(objs, req: RequestAttrs):
    """(connection decision, request decision) for one request on its connection."""
    a = Authorizer()
    s = snap(*objs)
    base = ConnectionAttrs(req.principal, req.source_ip, req.destination_ip, req.destination_port)
    return a.decide(s, WEB, base), a.decide_request(s, WEB, req)


ALLOW_PUBLIC_GET = policy("public", {"rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/public/*"]}}]}]})


# ------------------------------------------------------------------ the connection's bounds

def test_l7_allow_leaves_the_connection_to_its_requests():
    c, r = both([ALLOW_PUBLIC_GET], request(path="/public/a"))
    assert c.needs_request and not c.allowed  # fail-closed answer for non-HTTP traffic
    assert r.allowed and r.policy == "shop/public"


@pytest.mark.parametrize("method,path,allowed", [
    ("GET", "/public/a", True), ("GET", "/public/", True), ("POST", "/public/a", False), ("GET", "/admin", False),
    ("GET", "/public", False), ("get", "/public/a", False),  # methods are exact (case-sensitive) as in Istio
])
def test_allow_get_public(method, path, allowed):
    assert both([ALLOW_PUBLIC_GET], request(method, path))[1].allowed is allowed


def test_deny_on_a_path_for_another_principal_is_final_on_the_connection():
    deny = policy("deny", {"action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/x/sa/y"]}}],
                                                        "to": [{"operation": {"paths": ["/admin*"]}}]}]})
    c, _ = both([deny], request())
    assert c.allowed and not c.needs_request  # this principal can never match: no parsing needed


def test_deny_on_a_path_needs_the_request_and_fails_closed():
    deny = policy("deny", {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]})
    c, r = both([deny], request(path="/admin/x"))
    assert c.needs_request and not c.allowed
    assert not r.allowed and r.policy == "shop/deny"
    assert both([deny], request(path="/ok"))[1].allowed


def test_allow_on_l4_alone_is_final_although_another_rule_is_l7():
    p = policy("mixed", {"rules": [{"from": [{"source": {"principals": [FRONT]}}]},
                                   {"to": [{"operation": {"methods": ["GET"]}}]}]})
    c, _ = both([p], request())
    assert c.allowed and not c.needs_request


def test_allow_l7_for_another_namespace_is_denied_on_the_connection():
    p = policy("ns", {"rules": [{"from": [{"source": {"namespaces": ["billing"]}}],
                                 "to": [{"operation": {"methods": ["GET"]}}]}]})
    c, _ = both([p], request())
    assert not c.allowed and not c.needs_request


# ------------------------------------------------------------------ request fields

@pytest.mark.parametrize("hosts,host,allowed", [
    (["web.shop"], "web.shop:8080", True), (["WEB.shop"], "web.SHOP", True), (["*.shop"], "web.shop:8080", True),
    (["web.shop:8080"], "web.shop:8080", True), (["web.shop:9090"], "web.shop:8080", False),
    (["other"], "web.shop", False),
])
def test_hosts_case_insensitive_with_or_without_port(hosts, host, allowed):
    p = policy("h", {"rules": [{"to": [{"operation": {"hosts": hosts}}]}]})
    assert both([p], request(host=host))[1].allowed is allowed


def test_not_paths_and_not_methods():
    p = policy("n", {"rules": [{"to": [{"operation": {"notPaths": ["/admin*"], "notMethods": ["DELETE"]}}]}]})
    assert both([p], request("GET", "/x"))[1].allowed
    assert not both([p], request("GET", "/admin"))[1].allowed
    assert not both([p], request("DELETE", "/x"))[1].allowed


def test_request_principals_require_a_token():
    p = policy("jwt", {"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]})
    assert not both([p], request())[1].allowed
    assert both([p], request(principal=f"{ISS}/alice"))[1].allowed
    exact = policy("jwt", {"rules": [{"from": [{"source": {"requestPrincipals": [f"{ISS}/bob"]}}]}]})
    assert not both([exact], request(principal=f"{ISS}/alice"))[1].allowed


def test_deny_requests_without_a_token_with_not_request_principals():
    p = policy("no-jwt", {"action": "DENY", "rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}]})
    assert not both([p], request())[1].allowed
    assert both([p], request(principal=f"{ISS}/alice"))[1].allowed


@pytest.mark.parametrize("cond,req,allowed", [
    ({"key": "request.headers[x-user]", "values": ["admin"]}, request(headers={"x-user": "admin"}), True),
    ({"key": "request.headers[X-User]", "values": ["adm*"]}, request(headers={"x-user": "admin"}), True),
    ({"key": "request.headers[x-user]", "values": ["admin"]}, request(), False),
    ({"key": "request.headers[x-user]", "notValues": ["evil"]}, request(headers={"x-user": "ok"}), True),
    ({"key": "request.auth.principal", "values": [f"{ISS}/alice"]}, request(principal=f"{ISS}/alice"), True),
    ({"key": "request.auth.claims[groups]", "values": ["admins"]},
     request(principal="p", claims={"groups": ["dev", "admins"]}), True),
    ({"key": "request.auth.claims[groups]", "values": ["admins"]}, request(principal="p", claims={"groups": "dev"}),
     False),
    ({"key": "request.auth.claims[org][team]", "values": ["core"]},
     request(principal="p", claims={"org": {"team": "core"}}), True),
    ({"key": "request.auth.claims[n]", "values": ["1"]}, request(principal="p", claims={"n": 1}), False),
    ({"key": "request.auth.audiences", "values": ["shop"]}, request(principal="p", audiences=("a", "shop")), True),
    ({"key": "request.auth.presenter", "values": ["app"]}, request(principal="p", presenter="app"), True),
    ({"key": "request.auth.presenter", "values": ["app"]}, request(principal="p"), False),
    ({"key": "source.principal", "values": [FRONT]}, request(), True),
])
def test_when_conditions(cond, req, allowed):
    p = policy("w", {"rules": [{"when": [cond]}]})
    assert both([p], req)[1].allowed is allowed


def test_malformed_request_key_fails_closed():
    p = policy("w", {"rules": [{"when": [{"key": "request.headers[]", "values": ["x"]}]}]})
    c, r = both([p], request())
    assert not c.allowed and not c.needs_request and c.policy == "shop/w"  # unreadable: denies what it selects


# ------------------------------------------------------------------ the gate

class _Metrics:
    def __init__(self):
        self.decisions = []

    def authz_decision(self, direction, d):
        self.decisions.append((direction, d.action, d.metric_result, d.policy))


AUTHN = ConfigObject("RequestAuthentication", "shop", "jwt", json.dumps(
    {"jwtRules": [{"issuer": ISS, "jwks": jwks_text(jwk_of(RSA_KEY, "k1")), "audiences": ["shop"]}]}))
REQUIRE_JWT = policy("require-jwt", {"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]})


def gate_for(*objs, mesh_spec=None):
    metrics = _Metrics()
    s = NodeSnapshot(node="n1", config=(ConfigObject("MeshConfig", "mesh-root", "default",
                                                     json.dumps(mesh_spec or {})), *objs))
    authz = AuthzGate(metrics, "inbound")
    rp = RequestPolicy(authz, RequestAuthn(lambda uri: None))
    c = conn()
    verdict = authz.check(s, WEB, c.principal, c.source_ip, c.destination_ip, c.destination_port)
    return rp.gate(s, WEB, c, verdict), metrics


def check(gate, target=b"/", method=b"GET", headers=()):
    return gate.check(method, target, b"web.shop:8080", list(headers))


def test_no_policy_no_gate():
    assert gate_for()[0] is None
    assert gate_for(policy("l4", {"rules": [{"from": [{"source": {"principals": [FRONT]}}]}]}))[0] is None


@pytest.mark.parametrize("target", [b"/public/../admin", b"/public/%2e%2e/admin", b"/public/%2E./admin",
                                    b"/public/./../admin", b"//admin", b"/public/..%2fadmin",
                                    b"/public/%2e%2e%2fadmin"])
def test_normalization_bypasses_are_refused(target):
    gate, _ = gate_for(ALLOW_PUBLIC_GET)
    verdict = check(gate, target)
    assert isinstance(verdict, GateDenial) and verdict.status in (400, 403)


def test_the_normalized_path_is_forwarded():
    gate, metrics = gate_for(ALLOW_PUBLIC_GET)
    assert check(gate, b"/public//a/./b/../c?x=%2F") == (b"/public/a/c?x=%2F", [])
    assert check(gate, b"/public/a") == (b"/public/a", [])
    assert metrics.decisions[-1] == ("inbound", "ALLOW", "allow", "shop/public")


def test_escaped_slash_is_400_by_default_and_configurable():
    gate, _ = gate_for(ALLOW_PUBLIC_GET)
    verdict = check(gate, b"/public/a%2Fb")
    assert isinstance(verdict, GateDenial) and (verdict.status, verdict.flag) == (400, "DPE")
    keep, _ = gate_for(ALLOW_PUBLIC_GET, mesh_spec={"pathNormalization": {"escapedSlashes": "KEEP_UNCHANGED"}})
    assert check(keep, b"/public/a%2fb") == (b"/public/a%2Fb", [])
    unescape, _ = gate_for(ALLOW_PUBLIC_GET, mesh_spec={"pathNormalization": {"escapedSlashes":
                                                                              "UNESCAPE_AND_FORWARD"}})
    assert check(unescape, b"/public/a%2Fb") == (b"/public/a/b", [])
    denied = check(unescape, b"/public/..%2Fadmin")
    assert isinstance(denied, GateDenial) and denied.status == 403


def test_denial_is_403_rbac_and_counted():
    gate, metrics = gate_for(ALLOW_PUBLIC_GET)
    verdict = check(gate, b"/admin")
    assert verdict == GateDenial("RBAC", 403, "RBAC: access denied")
    assert metrics.decisions == [("inbound", "ALLOW", "deny", "shop/public")]


def test_jwt_valid_passes_and_the_token_is_not_forwarded():
    gate, _ = gate_for(AUTHN, REQUIRE_JWT)
    target, headers = check(gate, headers=[(b"authorization", b"Bearer " + sign().encode()), (b"accept", b"*/*")])
    assert headers == [(b"accept", b"*/*")]


@pytest.mark.parametrize("token", [sign(exp=1), sign(aud="billing"), sign(iss="https://evil.example.com"),
                                   sign(RSA_OTHER), "e30.e30.", "garbage"])
def test_jwt_invalid_is_401_with_www_authenticate(token):
    gate, _ = gate_for(AUTHN)  # RequestAuthentication alone makes a gate
    verdict = check(gate, headers=[(b"authorization", b"Bearer " + token.encode())])
    assert isinstance(verdict, GateDenial) and (verdict.status, verdict.flag) == (401, "JWT")
    assert verdict.headers[0][0] == b"www-authenticate" and b'error="invalid_token"' in verdict.headers[0][1]


def test_missing_token_passes_unless_required():
    assert check(gate_for(AUTHN)[0]) == (b"/", [])
    assert check(gate_for(AUTHN, REQUIRE_JWT)[0]) == GateDenial("RBAC", 403, "RBAC: access denied")


def test_a_denied_connection_gets_no_gate():
    deny = policy("deny", {"action": "DENY", "rules": [{}]})
    assert gate_for(AUTHN, deny)[0] is None


def test_escaped_slashes_of_meshconfig():
    def s(spec):
        return NodeSnapshot(node="n", config=(ConfigObject("MeshConfig", "m", "default", json.dumps(spec)),))
    assert escaped_slashes_of(s({})) is EscapedSlashes.REJECT
    assert escaped_slashes_of(s({"pathNormalization": {"escapedSlashes": "KEEP_UNCHANGED"}})) \
        is EscapedSlashes.KEEP_UNCHANGED
    assert escaped_slashes_of(s({"pathNormalization": {"escapedSlashes": "BOGUS"}})) is EscapedSlashes.REJECT
    assert escaped_slashes_of(NodeSnapshot(node="n")) is EscapedSlashes.REJECT


def test_the_snapshot_in_force_judges_each_request():
    """A policy change applies to an open (keep-alive) connection at its next request."""
    def with_web(*objs):
        return dataclasses.replace(snap(*objs), workloads=(WEB,))
    first = with_web(ALLOW_PUBLIC_GET)
    current = [first]
    authz = AuthzGate(_Metrics(), "inbound")
    rp = RequestPolicy(authz, RequestAuthn(lambda uri: None), lambda: current[0])
    c = conn()
    gate = rp.gate(first, WEB, c, authz.check(first, WEB, c.principal, c.source_ip, c.destination_ip,
                                              c.destination_port))
    assert check(gate, b"/public/a") == (b"/public/a", [])
    current[0] = with_web(policy("nothing", {"action": "ALLOW"}))
    assert check(gate, b"/public/a") == GateDenial("RBAC", 403, "RBAC: access denied")
    current[0] = snap()  # the workload left the mesh
    assert check(gate, b"/public/a").status == 503
