"""AuthorizationPolicy on connections: Istio's documented semantics, table-driven, no sockets."""

from __future__ import annotations

import json

import pytest

from nodeagent.proxy.authz import (ALLOW, AUDIT, DENY, Authorizer, ConnectionAttrs, compile_rule, parse_policy,
                                   string_matcher)
from nodeagent.state import ConfigObject, NodeSnapshot, Workload

WEB = Workload("web-1", "shop", "n1", "198.18.1.10", "web", (("app", "web"), ("version", "v1")))
DB = Workload("db-1", "shop", "n1", "198.18.1.11", "db", (("app", "db"),))
OTHER = Workload("x-1", "other", "n1", "198.18.1.12", "x", (("app", "web"),))

FRONT = "cluster.local/ns/front/sa/ui"      # an mTLS source in namespace front
SHOP_WEB = "cluster.local/ns/shop/sa/web"


def conn(principal=FRONT, src="198.18.2.5", port=8080, dst="198.18.1.10") -> ConnectionAttrs:
    return ConnectionAttrs(principal, src, dst, port)


def policy(name, spec, ns="shop") -> ConfigObject:
    return ConfigObject("AuthorizationPolicy", ns, name, json.dumps(spec))


def snap(*objs, root="mesh-root") -> NodeSnapshot:
    return NodeSnapshot(node="n1", config=(ConfigObject("MeshConfig", root, "default", "{}"), *objs))


def decide(objs, c=None, w=WEB, root="mesh-root"):
    return Authorizer().decide(snap(*objs, root=root), w, c or conn())


# ------------------------------------------------------------------ precedence and scope

def test_no_policy_allows():
    d = decide([])
    assert d.allowed and d.policy == ""


def test_allow_with_no_rules_denies_everything():
    d = decide([policy("allow-nothing", {"action": "ALLOW"})])
    assert not d.allowed and d.policy == "shop/allow-nothing" and d.reason == "no ALLOW policy matched"


def test_allow_with_empty_rule_allows_everything():
    assert decide([policy("allow-all", {"action": "ALLOW", "rules": [{}]})]).allowed


def test_deny_with_empty_rule_denies_everything_even_with_allow_all():
    d = decide([policy("allow-all", {"rules": [{}]}), policy("deny-all", {"action": "DENY", "rules": [{}]})])
    assert not d.allowed and (d.policy, d.action) == ("shop/deny-all", DENY)


def test_deny_without_rules_denies_nothing():
    assert decide([policy("deny", {"action": "DENY"})]).allowed


def test_deny_wins_over_a_matching_allow():
    objs = [policy("a", {"rules": [{"from": [{"source": {"namespaces": ["front"]}}]}]}),
            policy("d", {"action": "DENY", "rules": [{"from": [{"source": {"principals": [FRONT]}}]}]})]
    assert not decide(objs).allowed
    assert decide(objs, conn(principal="cluster.local/ns/front/sa/other")).allowed


def test_allow_policy_present_but_not_matching_denies():
    objs = [policy("a", {"rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]})]
    assert not decide(objs).allowed
    assert decide(objs, conn(principal=SHOP_WEB)).allowed


def test_selector_limits_the_policy_to_matching_workloads():
    objs = [policy("deny-web", {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY", "rules": [{}]})]
    assert not decide(objs, w=WEB).allowed
    assert decide(objs, w=DB).allowed
    assert decide(objs, w=OTHER).allowed   # same labels, other namespace


def test_namespace_wide_policy_applies_to_its_namespace_only():
    objs = [policy("ns-deny", {"action": "DENY", "rules": [{}]})]
    assert not decide(objs, w=WEB).allowed and not decide(objs, w=DB).allowed
    assert decide(objs, w=OTHER).allowed


def test_root_namespace_policy_is_mesh_wide():
    objs = [policy("mesh-deny", {"action": "DENY", "rules": [{}]}, ns="mesh-root")]
    assert not decide(objs, w=WEB).allowed and not decide(objs, w=OTHER).allowed


def test_root_namespace_policy_with_selector_selects_in_every_namespace():
    objs = [policy("mesh-deny-web", {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
                                     "rules": [{}]}, ns="mesh-root")]
    assert not decide(objs, w=WEB).allowed and not decide(objs, w=OTHER).allowed and decide(objs, w=DB).allowed


def test_audit_is_recorded_and_changes_nothing():
    objs = [policy("audit", {"action": "AUDIT", "rules": [{}]})]
    d = decide(objs)
    assert d.allowed and d.audited == ("shop/audit",)
    d = decide(objs + [policy("deny", {"action": "DENY", "rules": [{}]})])
    assert not d.allowed and d.audited == ("shop/audit",)


# ------------------------------------------------------------------ fields

@pytest.mark.parametrize("source, c, matches", [
    ({"principals": [FRONT]}, conn(), True),
    ({"principals": ["cluster.local/ns/front/*"]}, conn(), True),
    ({"principals": ["*/sa/ui"]}, conn(), True),
    ({"principals": ["*"]}, conn(), True),
    ({"principals": ["*"]}, conn(principal=None), False),           # plaintext has no principal
    ({"notPrincipals": ["*"]}, conn(principal=None), True),
    ({"notPrincipals": [FRONT]}, conn(), False),
    ({"namespaces": ["front"]}, conn(), True),
    ({"namespaces": ["shop", "front"]}, conn(), True),
    ({"namespaces": ["fr*"]}, conn(), True),
    ({"namespaces": ["front"]}, conn(principal=None), False),
    ({"notNamespaces": ["front"]}, conn(), False),
    ({"notNamespaces": ["front"]}, conn(principal=None), True),
    ({"ipBlocks": ["198.18.2.0/24"]}, conn(), True),
    ({"ipBlocks": ["198.18.2.5"]}, conn(), True),
    ({"ipBlocks": ["198.18.3.0/24"]}, conn(), False),
    ({"notIpBlocks": ["198.18.2.0/24"]}, conn(), False),
    ({"remoteIpBlocks": ["198.18.2.0/24"]}, conn(), True),
    ({"namespaces": ["front"], "ipBlocks": ["198.18.3.0/24"]}, conn(), False),   # fields ANDed
])
def test_source_fields(source, c, matches):
    assert compile_rule({"from": [{"source": source}]}, ALLOW)(c) is matches


@pytest.mark.parametrize("operation, port, matches", [
    ({"ports": [8080]}, 8080, True), ({"ports": [9090, 8080]}, 8080, True), ({"ports": [9090]}, 8080, False),
    ({"notPorts": [9090]}, 8080, True), ({"notPorts": [8080]}, 8080, False),
])
def test_operation_ports(operation, port, matches):
    assert compile_rule({"to": [{"operation": operation}]}, ALLOW)(conn(port=port)) is matches


@pytest.mark.parametrize("cond, matches", [
    ({"key": "source.ip", "values": ["198.18.2.0/24"]}, True),
    ({"key": "remote.ip", "values": ["198.18.9.0/24"]}, False),
    ({"key": "source.namespace", "values": ["front"]}, True),
    ({"key": "source.namespace", "notValues": ["front"]}, False),
    ({"key": "source.principal", "values": ["*"], "notValues": [FRONT]}, False),
    ({"key": "destination.port", "values": ["8080"]}, True),
    ({"key": "destination.ip", "values": ["198.18.1.0/24"]}, True),
])
def test_when_conditions(cond, matches):
    assert compile_rule({"when": [cond]}, ALLOW)(conn()) is matches


def test_from_entries_are_ored_and_from_to_when_are_anded():
    rule = {"from": [{"source": {"namespaces": ["shop"]}}, {"source": {"namespaces": ["front"]}}],
            "to": [{"operation": {"ports": [8080]}}],
            "when": [{"key": "source.ip", "values": ["198.18.2.0/24"]}]}
    p = compile_rule(rule, ALLOW)
    assert p(conn()) and not p(conn(port=9090)) and not p(conn(src="198.18.3.1"))


def test_string_matcher():
    assert string_matcher("abc")("abc") and not string_matcher("abc")("abcd")
    assert string_matcher("ab*")("abcd") and not string_matcher("ab*")(None)
    assert string_matcher("*cd")("abcd") and not string_matcher("*cd")("abc")
    assert string_matcher("*")("x") and not string_matcher("*")("") and not string_matcher("*")(None)


# ------------------------------------------------------------------ fail closed

def test_l7_fields_fail_closed_allow_does_not_match_deny_does():
    allow_get = policy("allow-get", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})
    assert not decide([allow_get]).allowed
    deny_post = policy("deny-post", {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["front"]}}],
                                                                  "to": [{"operation": {"methods": ["POST"]}}]}]})
    assert not decide([deny_post]).allowed                          # denies on the connection attributes
    assert decide([deny_post], conn(principal=SHOP_WEB)).allowed      # which still have to match
    header = policy("h", {"rules": [{"when": [{"key": "request.headers[x-user]", "values": ["a"]}]}]})
    assert not decide([header]).allowed


@pytest.mark.parametrize("spec", [
    "not json", "[]", {"action": "CUSTOM", "rules": [{}]}, {"rules": [{"from": [{"source": {"ipBlocks": ["nope"]}}]}]},
    {"rules": [{"when": [{"key": "connection.sni", "values": ["x"]}]}]}, {"rules": "x"},
    {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
])
def test_a_policy_the_agent_cannot_read_denies_what_it_would_apply_to(spec):
    text = spec if isinstance(spec, str) else json.dumps(spec)
    d = Authorizer().decide(snap(ConfigObject("AuthorizationPolicy", "shop", "bad", text)), WEB, conn())
    assert not d.allowed and d.policy == "shop/bad"


def test_unreadable_policy_keeps_its_selector():
    bad = policy("bad", {"selector": {"matchLabels": {"app": "db"}}, "action": "CUSTOM"})
    assert decide([bad], w=WEB).allowed and not decide([bad], w=DB).allowed


def test_snapshot_change_recompiles():
    a = Authorizer()
    deny = snap(policy("d", {"action": "DENY", "rules": [{}]}))
    assert not a.decide(deny, WEB, conn()).allowed
    assert a.decide(snap(), WEB, conn()).allowed


def test_summary_lists_policies_per_workload():
    objs = (policy("w", {"selector": {"matchLabels": {"app": "web"}}, "rules": [{}]}),
            policy("ns", {"action": "AUDIT", "rules": [{}]}),
            policy("mesh", {"action": "DENY"}, ns="mesh-root"))
    out = Authorizer().summary(snap(*objs), [WEB, DB])
    assert out[0] == {"workload": "shop/web-1", "policies": [
        {"policy": "shop/ns", "action": AUDIT, "scope": "namespace", "rules": 1, "checks": "connection"},
        {"policy": "mesh-root/mesh", "action": DENY, "scope": "mesh", "rules": 0, "checks": "connection"},
        {"policy": "shop/w", "action": ALLOW, "scope": "workload", "rules": 1, "checks": "connection"}]}
    assert [p["policy"] for p in out[1]["policies"]] == ["shop/ns", "mesh-root/mesh"]


def test_parse_policy_defaults_to_allow():
    assert parse_policy("shop", "p", "{}").action == ALLOW
