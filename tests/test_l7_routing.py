"""L7 routing decisions (Gateway API HTTPRoute/GRPCRoute, GAMMA) and filters: no sockets."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.proxy.l7.filters import (DirectResponse, FilterChain, HeaderModifier, MirrorSpec, PathModifier,
                                        RequestRedirect, UrlRewrite, prefix_matches, replace_prefix_match,
                                        rewrite_target, split_authority, split_target)
from nodeagent.proxy.l7.lb import LbConfig, LbState
from nodeagent.proxy.l7.routing import (NO_ROUTE, UNKNOWN_SERVICE, NoRoute, RequestInfo, RouteDecision, RouteTable,
                                        Timeouts, parse_duration)
from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot, Service, ServicePort

NODE = "node-1"


def service(name: str, ip: str, ns: str = "shop", ports=((80, 8080, "http"),), n_eps: int = 2) -> Service:
    sports = tuple(ServicePort(p, t, name=nm) for p, t, nm in ports)
    eps = tuple(Endpoint(f"198.18.{i + 1}.{int(ip.rsplit('.', 1)[1])}", sp.target_port, f"node-{i + 1}", f"{name}-{i}", ns)
                for sp in sports for i in range(n_eps))
    return Service(name, ns, ip, sports, eps)


WEB = service("web", "198.19.0.10")
V1 = service("web-v1", "198.19.0.11")
V2 = service("web-v2", "198.19.0.12")
V3 = service("web-v3", "198.19.0.13")
MIRROR = service("mirror", "198.19.0.14")
MULTI = service("multi", "198.19.0.20", ports=((80, 8080, "http"), (9090, 9091, "metrics")))
OTHER_NS = service("api", "198.19.0.30", ns="other")
GRPC = service("greeter", "198.19.0.40", ports=((50051, 50051, "grpc"),))
SERVICES = (WEB, V1, V2, V3, MIRROR, MULTI, OTHER_NS, GRPC)


@dataclass(frozen=True)
class TimedConfig(ConfigObject):
    """A ConfigObject with the creation timestamp a control plane may add later."""

    creation_timestamp: str = ""


def parent(name="web", **kw):
    return {"kind": "Service", "group": "", "name": name, **kw}


def ref(name, weight=None, **kw):
    out = {"name": name, "port": kw.pop("port", 80), **kw}
    if weight is not None:
        out["weight"] = weight
    return out


def http_route(name, rules, ns="shop", parents=None, ts=None):
    spec = {"parentRefs": parents or [parent()], "rules": rules}
    if ts is not None:
        return TimedConfig("HTTPRoute", ns, name, json.dumps(spec), creation_timestamp=ts)
    return ConfigObject("HTTPRoute", ns, name, json.dumps(spec))


def grpc_route(name, rules, ns="shop", parents=None):
    spec = {"parentRefs": parents or [parent("greeter")], "rules": rules}
    return ConfigObject("GRPCRoute", ns, name, json.dumps(spec))


def policy(target, ns="shop", name=None, **spec):
    return ConfigObject("TrafficPolicy", ns, name or f"tp-{target}",
                        json.dumps({"targetRef": {"kind": "Service", "name": target}, **spec}))


def table(*config, services=SERVICES, rand=None) -> RouteTable:
    return RouteTable.from_snapshot(NodeSnapshot(node=NODE, services=services, config=tuple(config)),
                                    rand=rand if rand is not None else random.Random(7))


def req(path="/", method="GET", headers=(), svc=WEB, port=80, **kw) -> RequestInfo:
    return RequestInfo(method, path, list(headers), kw.pop("authority", f"{svc.name}.{svc.namespace}"),
                       dst_ip=svc.cluster_ip, dst_port=port, **kw)


def rule(*matches, backends=None, **kw):
    out = {"backendRefs": backends if backends is not None else [ref("web-v1")], **kw}
    if matches:
        out["matches"] = list(matches)
    return out


def chosen(d) -> str:
    assert isinstance(d, RouteDecision), d
    return f"{d.route.name}#{d.route.rule}" if d.route else "default"


# ------------------------------------------------------------------ default route & lookup

def test_no_route_attached_is_default_route_to_the_service_itself():
    t = table()
    d = t.match(req("/anything?x=1"))
    assert isinstance(d, RouteDecision) and d.is_default
    assert d.backend.service is WEB and d.backend.port.port == 80
    assert d.backend.endpoints == WEB.endpoints
    assert d.mirrors == () and d.timeouts == Timeouts()
    # precomputed: the same object every time, nothing allocated per request
    assert t.match(req("/other")) is d


def test_default_route_of_multi_port_service_uses_that_ports_endpoints():
    t = table()
    d = t.match(req(svc=MULTI, port=9090))
    assert {e.port for e in d.backend.endpoints} == {9091}
    assert {e.port for e in t.match(req(svc=MULTI, port=80)).backend.endpoints} == {8080}


def test_unknown_destination_is_no_route():
    t = table()
    d = t.match(RequestInfo(b"GET", b"/", [], b"example.com", dst_ip="10.1.1.1", dst_port=80))
    assert d is UNKNOWN_SERVICE and isinstance(d, NoRoute) and d.status == 404 and d.flag == "NR"


@pytest.mark.parametrize("authority,src_ns,port", [
    ("web.shop.svc.cluster.local", "", 80), ("web.shop.svc.cluster.local.", "", 80), ("web.shop.svc", "", 80),
    ("web.shop", "", 80), ("WEB.Shop:80", "", 80), ("web", "shop", 80), ("198.19.0.10", "", 80),
    ("multi.shop:9090", "", 9090),
])
def test_router_found_by_authority(authority, src_ns, port):
    t = table()
    r = t.router_for_authority(authority, src_ns)
    assert r is not None and r.port.port == port
    assert t.match(RequestInfo("GET", "/", [], authority, source_namespace=src_ns)).port.port == port


def test_short_name_needs_the_clients_namespace():
    t = table()
    assert t.router_for_authority("web", "other") is None
    assert t.router_for_authority("web.shop:81") is None


def test_vip_wins_over_authority():
    t = table()
    d = t.match(RequestInfo("GET", "/", [], "multi.shop", dst_ip=WEB.cluster_ip, dst_port=80))
    assert d.service is WEB


# ------------------------------------------------------------------ precedence

PRECEDENCE = [
    # (rules as (match, ...) per rule, request path, method, headers, expected rule index)
    ([{"path": {"type": "PathPrefix", "value": "/foo"}}, {"path": {"type": "Exact", "value": "/foo"}}],
     "/foo", "GET", [], 1),
    ([{"path": {"type": "PathPrefix", "value": "/foo"}}, {"path": {"type": "Exact", "value": "/foo"}}],
     "/foo/bar", "GET", [], 0),
    ([{"path": {"type": "PathPrefix", "value": "/foo"}}, {"path": {"type": "PathPrefix", "value": "/foo/bar"}}],
     "/foo/bar/baz", "GET", [], 1),
    ([{"path": {"type": "PathPrefix", "value": "/foo"}}, {"path": {"type": "PathPrefix", "value": "/foo/bar"}}],
     "/foo/barn", "GET", [], 0),
    # exact beats a longer prefix
    ([{"path": {"type": "PathPrefix", "value": "/a/b/c"}}, {"path": {"type": "Exact", "value": "/a/b/c"}}],
     "/a/b/c", "GET", [], 1),
    # prefix (even "/") beats regex (Istio's order; regex precedence is implementation-specific)
    ([{"path": {"type": "RegularExpression", "value": "/foo[0-9]+"}}, {"path": {"type": "PathPrefix", "value": "/"}}],
     "/foo12", "GET", [], 1),
    ([{"path": {"type": "RegularExpression", "value": "/foo[0-9]+"}}, {"path": {"type": "PathPrefix", "value": "/bar"}}],
     "/foo12", "GET", [], 0),
    # longer regex first
    ([{"path": {"type": "RegularExpression", "value": "/.*"}}, {"path": {"type": "RegularExpression", "value": "/v[0-9]/.*"}}],
     "/v1/x", "GET", [], 1),
    # regex must match the whole path
    ([{"path": {"type": "RegularExpression", "value": "/v[0-9]"}}, {"path": {"type": "Exact", "value": "/zzz"}}],
     "/v1/x", "GET", [], None),
    # method beats headers
    ([{"path": {"value": "/api"}, "headers": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]},
      {"path": {"value": "/api"}, "method": "GET"}],
     "/api/x", "GET", [("a", "1"), ("b", "2")], 1),
    # a longer prefix beats a method match
    ([{"path": {"value": "/api"}, "method": "GET"}, {"path": {"value": "/api/v1"}}],
     "/api/v1/x", "GET", [], 1),
    # more headers beat fewer
    ([{"headers": [{"name": "a", "value": "1"}]},
      {"headers": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]}],
     "/", "GET", [("a", "1"), ("b", "2")], 1),
    ([{"headers": [{"name": "a", "value": "1"}]},
      {"headers": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]}],
     "/", "GET", [("a", "1")], 0),
    # headers beat query params
    ([{"queryParams": [{"name": "q", "value": "1"}, {"name": "r", "value": "2"}]},
      {"headers": [{"name": "a", "value": "1"}]}],
     "/?q=1&r=2", "GET", [("a", "1")], 1),
    # more query params beat fewer
    ([{"queryParams": [{"name": "q", "value": "1"}]},
      {"queryParams": [{"name": "q", "value": "1"}, {"name": "r", "value": "2"}]}],
     "/?r=2&q=1", "GET", [], 1),
    # a tie within a route: the first rule
    ([{"path": {"value": "/x"}}, {"path": {"value": "/x"}}], "/x", "GET", [], 0),
    # the trailing slash of a prefix does not count: /foo/ and /foo tie, first rule wins
    ([{"path": {"value": "/foo/"}}, {"path": {"value": "/foo"}, "method": "GET"}], "/foo", "GET", [], 1),
    # method mismatch falls through
    ([{"path": {"value": "/"}, "method": "POST"}, {"path": {"value": "/"}}], "/", "GET", [], 1),
    # nothing matches
    ([{"path": {"type": "Exact", "value": "/only"}}], "/other", "GET", [], None),
]


@pytest.mark.parametrize("matches,path,method,headers,expected", PRECEDENCE)
def test_precedence_table(matches, path, method, headers, expected):
    t = table(http_route("r", [rule(m) for m in matches]))
    d = t.match(req(path, method, headers))
    if expected is None:
        assert d is NO_ROUTE and d.status == 404 and d.flag == "NR" and d.grpc_status == 12
    else:
        assert chosen(d) == f"r#{expected}"


def test_precedence_spans_routes_and_ties_break_by_namespace_name():
    t = table(
        http_route("b-route", [rule({"path": {"value": "/api"}}, backends=[ref("web-v2")])]),
        http_route("a-route", [rule({"path": {"value": "/api"}}, backends=[ref("web-v1")])]),
        http_route("c-route", [rule({"path": {"type": "Exact", "value": "/api/x"}}, backends=[ref("web-v3")])]),
    )
    assert t.match(req("/api/y")).backend.service is V1          # a-route before b-route
    assert t.match(req("/api/x")).backend.service is V3          # exact beats both
    assert t.match(req("/other")) is NO_ROUTE


def test_ties_break_by_creation_timestamp_when_known():
    t = table(
        http_route("a-route", [rule({"path": {"value": "/api"}}, backends=[ref("web-v1")])], ts="2024-02-01T00:00:00Z"),
        http_route("z-route", [rule({"path": {"value": "/api"}}, backends=[ref("web-v2")])], ts="2024-01-01T00:00:00Z"),
    )
    assert t.match(req("/api")).backend.service is V2  # the older route wins over the name order


def test_a_rule_matches_if_any_of_its_matches_does():
    t = table(http_route("r", [rule({"path": {"type": "Exact", "value": "/a"}},
                                    {"path": {"value": "/b"}, "headers": [{"name": "v", "value": "2"}]})]))
    assert chosen(t.match(req("/a"))) == "r#0"
    assert chosen(t.match(req("/b/c", headers=[("v", "2")]))) == "r#0"
    assert t.match(req("/b/c")) is NO_ROUTE


def test_rule_without_matches_and_route_without_rules_match_everything():
    t = table(http_route("r", [{"backendRefs": [ref("web-v1")]}]))
    assert t.match(req("/x/y")).backend.service is V1
    t = table(ConfigObject("HTTPRoute", "shop", "r", json.dumps({"parentRefs": [parent()]})))
    d = t.match(req("/x"))
    assert isinstance(d, DirectResponse) and d.status == 500  # the default rule has no backend


@pytest.mark.parametrize("path,hit", [("/abc", True), ("/abc/", False), ("/Abc", False), ("/abcd", False),
                                      ("/abc?x=1", True)])
def test_exact_path_is_exact_and_case_sensitive(path, hit):
    t = table(http_route("r", [rule({"path": {"type": "Exact", "value": "/abc"}})]))
    assert isinstance(t.match(req(path)), RouteDecision) is hit


@pytest.mark.parametrize("prefix", ["/abc", "/abc/"])
@pytest.mark.parametrize("path,hit", [("/abc", True), ("/abc/", True), ("/abc/def", True), ("/abcd", False),
                                      ("/ABC", False), ("/", False)])
def test_path_prefix_is_element_wise(prefix, path, hit):
    t = table(http_route("r", [rule({"path": {"type": "PathPrefix", "value": prefix}})]))
    assert isinstance(t.match(req(path)), RouteDecision) is hit


def test_header_matching_semantics():
    t = table(http_route("r", [
        rule({"headers": [{"name": "X-Version", "value": "v2"}]}, backends=[ref("web-v2")]),
        rule({"headers": [{"name": "x-canary", "type": "RegularExpression", "value": "yes|true"}]},
             backends=[ref("web-v3")]),
        rule({"headers": [{"name": "dup", "value": "1"}, {"name": "DUP", "value": "2"}]}, backends=[ref("web-v1")]),
    ]))
    assert t.match(req(headers=[("x-version", "v2")])).backend.service is V2  # name case-insensitive
    assert t.match(req(headers=[("X-VERSION", "v2")])).backend.service is V2  # str headers lowercased
    assert t.match(req(headers=[("x-version", "V2")])) is NO_ROUTE          # value case-sensitive
    assert t.match(req(headers=[("x-canary", "true")])).backend.service is V3
    assert t.match(req(headers=[("x-canary", "truex")])) is NO_ROUTE        # full match
    # a repeated header is matched on its values joined with ","
    assert t.match(req(headers=[("x-canary", "yes"), ("x-canary", "no")])) is NO_ROUTE
    # only the first entry of a name counts
    assert t.match(req(headers=[("dup", "1")])).backend.service is V1


def test_query_param_matching_semantics():
    t = table(http_route("r", [
        rule({"queryParams": [{"name": "env", "value": "canary"}]}, backends=[ref("web-v2")]),
        rule({"queryParams": [{"name": "id", "type": "RegularExpression", "value": "[0-9]+"}]},
             backends=[ref("web-v3")]),
        rule({"queryParams": [{"name": "q", "value": "a b"}]}, backends=[ref("web-v1")]),
    ]))
    assert t.match(req("/?env=canary")).backend.service is V2
    assert t.match(req("/x?a=1&env=canary&env=prod")).backend.service is V2  # first value counts
    assert t.match(req("/?env=prod&env=canary")) is NO_ROUTE
    assert t.match(req("/?ENV=canary")) is NO_ROUTE                           # names are exact
    assert t.match(req("/?id=42")).backend.service is V3
    assert t.match(req("/?id=42a")) is NO_ROUTE
    assert t.match(req("/?q=a%20b")).backend.service is V1                   # values percent-decoded
    assert t.match(req("/?env")) is NO_ROUTE


def test_method_match():
    t = table(http_route("r", [rule({"method": "POST"}, backends=[ref("web-v2")]), rule()]))
    assert t.match(req(method="POST")).backend.service is V2
    assert t.match(req(method="GET")).backend.service is V1


def test_multiple_routes_on_one_service_are_merged():
    t = table(
        http_route("canary", [rule({"headers": [{"name": "x-canary", "value": "1"}]}, backends=[ref("web-v2")])]),
        http_route("main", [rule(backends=[ref("web-v1")])]),
    )
    assert t.match(req(headers=[("x-canary", "1")])).backend.service is V2
    assert t.match(req()).backend.service is V1
    assert t.routers[("shop", "web", 80)].producer.routes == ("shop/canary", "shop/main")


# ------------------------------------------------------------------ attachment

def test_parent_ref_port_restricts_to_that_port():
    t = table(http_route("r", [rule()], parents=[parent("multi", port=9090)]))
    assert t.match(req(svc=MULTI, port=9090)).backend.service is V1
    assert t.match(req(svc=MULTI, port=80)).is_default


def test_parent_ref_section_name_selects_the_port_by_name():
    t = table(http_route("r", [rule()], parents=[parent("multi", sectionName="http")]))
    assert t.match(req(svc=MULTI, port=80)).backend.service is V1
    assert t.match(req(svc=MULTI, port=9090)).is_default
    t = table(http_route("r", [rule()], parents=[parent("multi", sectionName="http", port=9090)]))
    assert t.match(req(svc=MULTI, port=80)).is_default and t.match(req(svc=MULTI, port=9090)).is_default


def test_parent_ref_without_port_attaches_to_every_port():
    t = table(http_route("r", [rule()], parents=[parent("multi")]))
    assert t.match(req(svc=MULTI, port=80)).backend.service is V1
    assert t.match(req(svc=MULTI, port=9090)).backend.service is V1


@pytest.mark.parametrize("pref", [
    {"name": "web"},                                   # kind defaults to Gateway
    {"kind": "Gateway", "name": "web"},
    {"kind": "Service", "name": "web"},                # group defaults to gateway.networking.k8s.io
    {"kind": "Service", "group": "", "name": "nope"},  # unknown service
    {"kind": "Service", "group": "", "name": "web", "namespace": "other"},
])
def test_parent_refs_that_do_not_attach(pref):
    t = table(http_route("r", [rule()], parents=[pref]))
    assert t.match(req()).is_default


def test_group_core_is_accepted():
    t = table(http_route("r", [rule()], parents=[{"kind": "Service", "group": "core", "name": "web"}]))
    assert t.match(req()).backend.service is V1


def test_consumer_routes_apply_only_to_their_namespace_and_replace_producer_routes():
    producer = http_route("prod", [rule(backends=[ref("web-v1", namespace="shop")])])
    consumer = http_route("cons", [rule(backends=[ref("web-v2", namespace="shop")], timeouts={"request": "100ms"})],
                          ns="fast", parents=[parent(namespace="shop")])
    t = table(producer, consumer)
    assert t.match(req(source_namespace="shop")).backend.service is V1
    assert t.match(req(source_namespace="elsewhere")).backend.service is V1
    d = t.match(req(source_namespace="fast"))
    assert d.backend.service is V2 and d.timeouts.request == 0.1
    # consumer routes alone: other clients keep the default route
    t = table(consumer)
    assert t.match(req(source_namespace="apps")).is_default
    assert t.match(req(source_namespace="fast")).backend.service is V2


def test_cross_namespace_backend_ref_is_allowed():
    t = table(http_route("r", [rule(backends=[ref("api", namespace="other")])]))
    assert t.match(req()).backend.service is OTHER_NS


def test_grpc_routes_take_precedence_over_http_routes_on_the_same_port():
    t = table(http_route("h", [rule(backends=[ref("web-v1")])], parents=[parent("greeter")]),
              grpc_route("g", [{"backendRefs": [ref("web-v2")]}]))
    d = t.match(req("/pkg.Svc/Call", svc=GRPC, port=50051, is_grpc=True))
    assert d.backend.service is V2 and d.route.kind == "GRPCRoute"
    assert any("GRPCRoutes take precedence" in e for e in t.errors)


# ------------------------------------------------------------------ backends & weights

def test_weighted_split_90_10_within_3_points_over_2000_draws():
    t = table(http_route("canary", [rule(backends=[ref("web-v1", 90), ref("web-v2", 10)])]), rand=random.Random(2024))
    counts = Counter(t.match(req()).backend.service.name for _ in range(2000))
    assert counts["web-v1"] + counts["web-v2"] == 2000
    assert abs(counts["web-v2"] / 2000 - 0.10) <= 0.03
    assert abs(counts["web-v1"] / 2000 - 0.90) <= 0.03


def test_weights_need_not_sum_to_100_and_default_to_1():
    t = table(http_route("r", [rule(backends=[ref("web-v1"), ref("web-v2"), ref("web-v3", 2)])]),
              rand=random.Random(1))
    counts = Counter(t.match(req()).backend.service.name for _ in range(4000))
    assert abs(counts["web-v3"] / 4000 - 0.5) < 0.04
    assert abs(counts["web-v1"] / 4000 - 0.25) < 0.04


def test_weight_zero_is_never_chosen():
    t = table(http_route("r", [rule(backends=[ref("web-v1", 0), ref("web-v2", 1), ref("web-v3", 0)])]))
    assert {t.match(req()).backend.service.name for _ in range(500)} == {"web-v2"}


def test_all_weights_zero_is_500():
    t = table(http_route("r", [rule(backends=[ref("web-v1", 0), ref("web-v2", 0)])]))
    d = t.match(req())
    assert type(d) is DirectResponse and d.status == 500 and d.flag == "NC" and d.grpc_status == 14


def test_rule_without_backend_refs_is_500():
    d = table(http_route("r", [{"matches": [{"path": {"value": "/"}}]}])).match(req())
    assert type(d) is DirectResponse and d.status == 500


@pytest.mark.parametrize("bad", [
    ref("does-not-exist"),
    ref("web-v1", port=81),
    ref("web-v1", kind="ServiceImport", group="multicluster.x-k8s.io"),
    ref("web-v1", namespace="nowhere"),
])
def test_missing_backend_gets_500_for_its_share(bad):
    t = table(http_route("r", [rule(backends=[ref("web-v1", 1), {**bad, "weight": 1}])]), rand=random.Random(5))
    results = [t.match(req()) for _ in range(2000)]
    errors = [d for d in results if isinstance(d, DirectResponse)]
    assert all(d.status == 500 and d.flag == "NC" for d in errors)
    assert all(d.backend.service is V1 for d in results if isinstance(d, RouteDecision))
    assert abs(len(errors) / 2000 - 0.5) < 0.04
    assert t.errors  # reported


def test_backend_ref_without_port_uses_the_parent_port():
    t = table(http_route("r", [rule(backends=[{"name": "multi"}])], parents=[parent("multi", port=9090)]))
    d = t.match(req(svc=MULTI, port=9090))
    assert d.backend.port.port == 9090 and {e.port for e in d.backend.endpoints} == {9091}


def test_backends_are_shared_objects_with_the_lb_config_of_their_traffic_policy():
    t = table(http_route("r", [rule(backends=[ref("web-v1")])]),
              policy("web-v1", loadBalancer={"type": "LEAST_REQUEST"}))
    d1, d2 = t.match(req("/a")), t.match(req("/b"))
    assert d1.backend is d2.backend
    assert d1.backend.lb == LbConfig("LEAST_REQUEST") and d1.backend.key == ("shop", "web-v1", 80)
    assert t.traffic_policy(V1)["loadBalancer"] == {"type": "LEAST_REQUEST"}
    assert t.traffic_policy(V2) is None and t.lb_config(V2) == LbConfig()
    # the decision plugs straight into the load balancer state
    ep = LbState(NODE, rng=random.Random(0)).pick(d1.backend)
    assert ep in V1.endpoints


# ------------------------------------------------------------------ gRPC

GRPC_RULES = [
    {"matches": [{"method": {"service": "helloworld.Greeter", "method": "SayHello"}}], "backendRefs": [ref("web-v1")]},
    {"matches": [{"method": {"service": "helloworld.Greeter"}}], "backendRefs": [ref("web-v2")]},
    {"matches": [{"method": {"method": "Check"}}], "backendRefs": [ref("web-v3")]},
    {"matches": [{"method": {"type": "RegularExpression", "service": "admin\\..*", "method": "Get.*"}}],
     "backendRefs": [ref("mirror")]},
    {"matches": [{"method": {"service": "helloworld.Greeter", "method": "SayBye"},
                  "headers": [{"name": "x-tier", "value": "gold"}]}], "backendRefs": [ref("web")]},
]


@pytest.mark.parametrize("path,headers,expected", [
    ("/helloworld.Greeter/SayHello", [], "web-v1"),
    ("/helloworld.Greeter/SayHelloAgain", [], "web-v2"),
    ("/helloworld.Greeter/SayBye", [("x-tier", "gold")], "web"),
    ("/helloworld.Greeter/SayBye", [], "web-v2"),
    ("/grpc.health.v1.Health/Check", [], "web-v3"),
    ("/admin.Users/GetUser", [], "mirror"),
    ("/admin.Users/ListUsers", [], None),
    ("/other.Svc/Method", [], None),
    ("/not-grpc", [], None),
    ("/helloworld.Greeter/SayHello/extra", [], None),
])
def test_grpc_method_matching(path, headers, expected):
    t = table(grpc_route("g", GRPC_RULES))
    d = t.match(req(path, "POST", [("content-type", "application/grpc"), *headers], svc=GRPC, port=50051,
                    is_grpc=True))
    if expected is None:
        assert d is NO_ROUTE and d.grpc_status == 12
    else:
        assert d.backend.service.name == expected


def test_grpc_precedence_more_service_chars_then_method_chars_then_headers():
    rules = [
        {"matches": [{"method": {"method": "SayHello"}}], "backendRefs": [ref("web-v3")]},
        {"matches": [{"method": {"service": "helloworld.Greeter"}}], "backendRefs": [ref("web-v2")]},
        {"matches": [{}], "backendRefs": [ref("web-v1")]},
    ]
    t = table(grpc_route("g", rules))
    assert t.match(req("/helloworld.Greeter/SayHello", svc=GRPC, port=50051)).backend.service is V2
    assert t.match(req("/x.Y/SayHello", svc=GRPC, port=50051)).backend.service is V3
    assert t.match(req("/x.Y/Z", svc=GRPC, port=50051)).backend.service is V1


def test_grpc_rule_without_matches_matches_every_request():
    t = table(grpc_route("g", [{"backendRefs": [ref("web-v1", 1), ref("web-v2", 0)]}]))
    assert t.match(req("/a.B/C", svc=GRPC, port=50051, is_grpc=True)).backend.service is V1


def test_grpc_invalid_backend_is_unavailable():
    t = table(grpc_route("g", [{"backendRefs": [ref("gone")]}]))
    d = t.match(req("/a.B/C", svc=GRPC, port=50051, is_grpc=True))
    assert d.status == 500 and d.grpc_status == 14


# ------------------------------------------------------------------ filters through the router

def test_request_and_response_header_modifiers_in_the_decision():
    t = table(http_route("r", [rule(filters=[
        {"type": "RequestHeaderModifier", "requestHeaderModifier": {
            "set": [{"name": "X-Env", "value": "prod"}], "add": [{"name": "x-trace", "value": "b"}],
            "remove": ["X-Debug"]}},
        {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-served-by", "value": "v1"}]}},
    ])]))
    d = t.match(req())
    target, authority, headers = d.rewrite_request(b"/p", b"web.shop", [(b"x-env", b"dev"), (b"x-trace", b"a"),
                                                                        (b"x-debug", b"1")])
    assert (target, authority) == (b"/p", b"web.shop")
    assert headers == [(b"x-trace", b"a,b"), (b"x-env", b"prod")]
    assert d.rewrite_response_headers([(b"content-type", b"text/plain")]) == [
        (b"content-type", b"text/plain"), (b"x-served-by", b"v1")]


def test_backend_level_filters_apply_only_to_that_backend():
    hm = [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-canary", "value": "1"}]}}]
    t = table(http_route("r", [rule(backends=[ref("web-v1", 1), {**ref("web-v2", 1), "filters": hm}])]),
              rand=random.Random(3))
    seen = {}
    for _ in range(200):
        d = t.match(req())
        seen[d.backend.service.name] = d.rewrite_request(b"/", b"h", [])[2]
    assert seen == {"web-v1": [], "web-v2": [(b"x-canary", b"1")]}


def test_no_filters_returns_inputs_unchanged():
    d = table().match(req())
    h = [(b"a", b"1")]
    assert d.rewrite_request(b"/x", b"h", h) == (b"/x", b"h", h)
    assert d.rewrite_response_headers(h) is h


def test_url_rewrite_replace_prefix_match_uses_the_matched_prefix():
    t = table(http_route("r", [rule({"path": {"value": "/api/v1/"}}, filters=[
        {"type": "URLRewrite", "urlRewrite": {"hostname": "backend.internal",
                                              "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v1"}}}])]))
    d = t.match(req("/api/v1/users?id=3"))
    assert d.matched_prefix == b"/api/v1/"
    assert d.rewrite_request(b"/api/v1/users?id=3", b"web.shop", [])[:2] == (b"/v1/users?id=3", b"backend.internal")
    assert d.rewrite_request(b"/api/v1", b"web.shop", [])[0] == b"/v1"


def test_url_rewrite_full_path():
    t = table(http_route("r", [rule({"path": {"value": "/old"}}, filters=[
        {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}}}])]))
    d = t.match(req("/old/x?y=1"))
    assert d.rewrite_request(b"/old/x?y=1", b"a", [])[0] == b"/new?y=1"


def test_redirect_is_a_response_decision():
    t = table(http_route("r", [
        {"matches": [{"path": {"value": "/old"}}], "filters": [{"type": "RequestRedirect", "requestRedirect": {
            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}, "statusCode": 301}}]},
        {"matches": [{"path": {"value": "/secure"}}], "filters": [{"type": "RequestRedirect", "requestRedirect": {
            "scheme": "https", "hostname": "secure.example.com"}}]},
        {"matches": [{"path": {"value": "/p"}}], "filters": [{"type": "RequestRedirect", "requestRedirect": {
            "port": 8443}}]},
    ]))
    d = t.match(req("/old/page?x=1", authority="web.shop:80"))
    assert type(d) is DirectResponse and d.status == 301 and d.flag == ""
    assert d.location == b"http://web.shop/new/page?x=1"
    d = t.match(req("/secure/a"))
    assert d.status == 302 and d.location == b"https://secure.example.com/secure/a"
    assert t.match(req("/p")).location == b"http://web.shop:8443/p"
    # no Host header: the Service's name
    assert t.match(req("/p", authority="")).location == b"http://web.shop.svc.cluster.local:8443/p"


def test_redirect_without_scheme_or_port_uses_the_service_port():
    t = table(http_route("r", [{"filters": [{"type": "RequestRedirect",
                                             "requestRedirect": {"hostname": "elsewhere"}}]}],
                         parents=[parent("multi", port=9090)]))
    d = t.match(req("/x", svc=MULTI, port=9090, authority="multi.shop:9090"))
    assert d.location == b"http://elsewhere:9090/x"


def test_mirrors_always_and_sampled():
    mirror_all = {"type": "RequestMirror", "requestMirror": {"backendRef": ref("mirror")}}
    mirror_pct = {"type": "RequestMirror", "requestMirror": {"backendRef": ref("web-v3"), "percent": 25}}
    mirror_frac = {"type": "RequestMirror", "requestMirror": {"backendRef": ref("web-v2"),
                                                              "fraction": {"numerator": 1, "denominator": 10}}}
    mirror_gone = {"type": "RequestMirror", "requestMirror": {"backendRef": ref("gone")}}
    t = table(http_route("r", [rule(filters=[mirror_all, mirror_pct, mirror_frac, mirror_gone])]),
              rand=random.Random(11))
    counts = Counter()
    for _ in range(4000):
        d = t.match(req())
        assert d.backend.service is V1
        assert d.mirrors[0].service is MIRROR
        counts.update(b.service.name for b in d.mirrors)
    assert counts["mirror"] == 4000
    assert abs(counts["web-v3"] / 4000 - 0.25) < 0.03
    assert abs(counts["web-v2"] / 4000 - 0.10) < 0.02
    assert "gone" not in counts and any("mirror dropped" in e for e in t.errors)


def test_zero_percent_mirror_never_fires():
    t = table(http_route("r", [rule(filters=[{"type": "RequestMirror", "requestMirror": {
        "backendRef": ref("mirror"), "percent": 0}}])]))
    assert all(t.match(req()).mirrors == () for _ in range(100))


@pytest.mark.parametrize("f", [
    {"type": "ExtensionRef", "extensionRef": {"group": "example.io", "kind": "Thing", "name": "x"}},
    {"type": "CORS", "cors": {}},
])
def test_unsupported_filter_is_not_skipped_but_answered_with_500(f):
    t = table(http_route("r", [rule(filters=[f])]))
    d = t.match(req())
    assert type(d) is DirectResponse and d.status == 500 and "unsupported filter" in d.message


# ------------------------------------------------------------------ timeouts

@pytest.mark.parametrize("text,seconds", [("10s", 10.0), ("500ms", 0.5), ("1h30m", 5400.0), ("0s", 0.0),
                                          ("2m3s4ms", 123.004), ("1.5s", 1.5), (3, 3.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "1d", "-1s", "1 s", "abc"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_rule_timeouts_and_traffic_policy_default():
    t = table(http_route("r", [rule({"path": {"value": "/slow"}}, timeouts={"request": "30s", "backendRequest": "10s"}),
                               rule({"path": {"value": "/off"}}, timeouts={"request": "0s"}),
                               rule({"path": {"value": "/"}})]),
              policy("web", timeout="5s"))
    assert t.match(req("/slow")).timeouts == Timeouts(30.0, 10.0)
    assert t.match(req("/off")).timeouts == Timeouts(0.0, None)
    assert t.match(req("/x")).timeouts == Timeouts(5.0, None)
    assert table(policy("web", timeout="2s")).match(req()).timeouts == Timeouts(2.0)


# ------------------------------------------------------------------ robustness

def test_bad_route_objects_are_reported_and_skipped():
    bad_regex = http_route("bad", [rule({"path": {"type": "RegularExpression", "value": "(unclosed"}})])
    good = http_route("good", [rule({"path": {"value": "/ok"}}, backends=[ref("web-v2")])])
    not_json = ConfigObject("HTTPRoute", "shop", "broken", "[1, 2]")
    t = table(bad_regex, good, not_json)
    assert t.match(req("/ok")).backend.service is V2
    assert any("shop/bad" in e and "regular expression" in e for e in t.errors)
    assert any("shop/broken" in e for e in t.errors)


def test_describe_is_json_serializable():
    t = table(http_route("r", [rule({"path": {"value": "/a"}, "method": "GET", "headers": [{"name": "x", "value": "1"}]})]),
              grpc_route("g", GRPC_RULES))
    out = json.loads(json.dumps(t.describe()))
    web = next(r for r in out if r["service"] == "web.shop.svc.cluster.local")
    assert web["producer"]["matches"][0]["route"] == "HTTPRoute/shop/r#0"
    assert web["producer"]["matches"][0]["path"] == {"type": "PathPrefix", "value": "/a"}


def test_backend_keys_cover_every_service_port():
    t = table()
    assert ("shop", "multi", 9090) in t.backend_keys() and len(t.backend_keys()) == 9


# ------------------------------------------------------------------ filters (pure functions)

def test_header_modifier_set_add_remove():
    hm = HeaderModifier.from_spec({
        "set": [{"name": "My-Header", "value": "bar"}, {"name": "my-header", "value": "ignored"}],
        "add": [{"name": "x-add", "value": "bar,baz"}, {"name": "set-cookie", "value": "b=2"}, {"name": "x-new", "value": "1"}],
        "remove": ["X-Gone"],
    })
    src = [(b"my-header", b"foo"), (b"My-Header", b"foo2"), (b"x-add", b"foo"), (b"x-gone", b"1"),
           (b"X-GONE", b"2"), (b"set-cookie", b"a=1")]
    out = hm.apply(src)
    assert out == [(b"x-add", b"foo,bar,baz"), (b"set-cookie", b"a=1"), (b"my-header", b"bar"),
                   (b"set-cookie", b"b=2"), (b"x-new", b"1")]
    assert src[0] == (b"my-header", b"foo") and len(src) == 6  # input untouched


def test_header_modifier_spec_examples():
    # the three examples of HTTPHeaderFilter in the Gateway API spec
    assert HeaderModifier.from_spec({"set": [{"name": "my-header", "value": "bar"}]}).apply(
        [(b"my-header", b"foo")]) == [(b"my-header", b"bar")]
    assert HeaderModifier.from_spec({"add": [{"name": "my-header", "value": "bar,baz"}]}).apply(
        [(b"my-header", b"foo")]) == [(b"my-header", b"foo,bar,baz")]
    assert HeaderModifier.from_spec({"remove": ["my-header1", "my-header3"]}).apply(
        [(b"my-header1", b"foo"), (b"my-header2", b"bar"), (b"my-header3", b"baz")]) == [(b"my-header2", b"bar")]


REPLACE_PREFIX_TABLE = [  # the table of HTTPPathModifier.ReplacePrefixMatch in the spec
    ("/foo/bar", "/foo", "/xyz", "/xyz/bar"), ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"), ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"), ("/foo/", "/foo", "/xyz", "/xyz/"), ("/foo/bar", "/foo", "", "/bar"),
    ("/foo/", "/foo", "", "/"), ("/foo", "/foo", "", "/"), ("/foo/", "/foo", "/", "/"), ("/foo", "/foo", "/", "/"),
]


@pytest.mark.parametrize("path,prefix,replacement,expected", REPLACE_PREFIX_TABLE)
def test_replace_prefix_match_spec_table(path, prefix, replacement, expected):
    assert replace_prefix_match(path.encode(), prefix.encode(), replacement.encode()) == expected.encode()


def test_replace_prefix_match_edge_cases():
    assert replace_prefix_match(b"/anything/x", b"/", b"/v2") == b"/v2/anything/x"
    assert replace_prefix_match(b"/", b"/", b"/v2") == b"/v2/"
    assert replace_prefix_match(b"/foobar", b"/foo", b"/x") == b"/foobar"  # not a match: unchanged
    assert rewrite_target(b"/foo/bar?a=1&b=2", PathModifier("ReplacePrefixMatch", b"/x"), b"/foo") == b"/x/bar?a=1&b=2"
    assert rewrite_target(b"/foo/bar?a=1", PathModifier("ReplaceFullPath", b"/full"), b"/foo") == b"/full?a=1"
    assert rewrite_target(b"/foo", None, None) == b"/foo"


def test_url_rewrite_hostname_only_keeps_path():
    rw = UrlRewrite.from_spec({"hostname": "api.internal"})
    assert rw.apply(b"/a?b", b"web:80", None) == (b"/a?b", b"api.internal")


@pytest.mark.parametrize("spec,authority,target,listener,expected", [
    ({}, "web.shop", "/a?q=1", 80, "http://web.shop/a?q=1"),
    ({}, "web.shop:8080", "/a", 8080, "http://web.shop:8080/a"),
    ({"scheme": "https"}, "web.shop:80", "/a", 80, "https://web.shop/a"),          # https -> 443, omitted
    ({"scheme": "http"}, "web.shop:8080", "/a", 8080, "http://web.shop/a"),         # http -> 80, omitted
    ({"scheme": "https", "port": 8443}, "web.shop", "/a", 80, "https://web.shop:8443/a"),
    ({"port": 80}, "web.shop:8080", "/a", 8080, "http://web.shop/a"),
    ({"hostname": "example.com"}, "web.shop:80", "/a", 80, "http://example.com/a"),
    ({"path": {"type": "ReplaceFullPath", "replaceFullPath": "/full"}}, "h", "/a/b?x", 80, "http://h/full?x"),
    ({}, "[fd00::1]:8080", "/", 8080, "http://[fd00::1]:8080/"),
])
def test_redirect_location(spec, authority, target, listener, expected):
    rr = RequestRedirect.from_spec(spec)
    loc = rr.location(scheme=b"http", authority=authority.encode(), target=target.encode(), listener_port=listener)
    assert loc == expected.encode()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_status_codes(code):
    d = RequestRedirect.from_spec({"statusCode": code}).response(scheme=b"http", authority=b"h", target=b"/",
                                                                  listener_port=80)
    assert d.status == code and d.headers == ((b"location", b"http://h/"),)


def test_redirect_rejects_other_status_codes():
    with pytest.raises(ValueError):
        RequestRedirect.from_spec({"statusCode": 200})


@pytest.mark.parametrize("target,expected", [
    (b"/a/b?x=1&y", (b"/a/b", b"x=1&y")), (b"/a#frag", (b"/a", b"")), (b"*", (b"*", b"")),
    (b"http://host:80/p?q", (b"/p", b"q")), (b"http://host", (b"/", b"")), (b"http://host?q=1", (b"/", b"q=1")),
    (b"/", (b"/", b"")),
])
def test_split_target(target, expected):
    assert split_target(target) == expected


@pytest.mark.parametrize("authority,expected", [
    (b"web:80", (b"web", 80)), (b"web", (b"web", None)), (b"[::1]:8", (b"[::1]", 8)), (b"[::1]", (b"[::1]", None)),
    (b"web:", (b"web:", None)),
])
def test_split_authority(authority, expected):
    assert split_authority(authority) == expected


def test_mirror_spec_probability():
    assert MirrorSpec.from_spec({"backendRef": {}}).probability == 1.0
    assert MirrorSpec.from_spec({"backendRef": {}, "percent": 30}).probability == 0.3
    assert MirrorSpec.from_spec({"backendRef": {}, "fraction": {"numerator": 1, "denominator": 1000}}).probability == 0.001
    assert MirrorSpec.from_spec({"backendRef": {}, "fraction": {"numerator": 5}}).probability == 0.05
    assert not MirrorSpec.from_spec({"percent": 0}).fires(lambda: 0.0)
    assert MirrorSpec.from_spec({}).fires(lambda: 0.999)


def test_filter_chain_order_rule_then_backend():
    rule_chain = FilterChain.compile([
        {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x", "value": "rule"}]}}])
    be_chain = FilterChain.compile([
        {"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x", "value": "backend"}]}}])
    chain = rule_chain.then(be_chain)
    assert chain.apply_request(b"/", b"h", [(b"x", b"client")])[2] == [(b"x", b"rule,backend")]
    assert rule_chain.then(FilterChain()) is rule_chain


# ------------------------------------------------------------------ properties

SEG = st.text(alphabet="abc", min_size=1, max_size=3)
PATHS = st.lists(SEG, min_size=0, max_size=4).map(lambda s: "/" + "/".join(s))
TRAILING = st.sampled_from(["", "/"])


def _segments_oracle(path: str, prefix: str) -> bool:
    p = prefix.rstrip("/")
    if not p:
        return True
    ps, xs = p.split("/"), path.split("/")
    return xs[:len(ps)] == ps


@given(PATHS, TRAILING, PATHS, TRAILING)
def test_prefix_match_is_element_wise(path, pslash, prefix, preslash):
    path_b, prefix_b = (path + pslash).encode(), (prefix + preslash).encode()
    assert prefix_matches(path_b, prefix_b) == _segments_oracle(path + pslash, prefix + preslash)


@given(PATHS, PATHS, TRAILING, st.lists(SEG, max_size=3).map(lambda s: "".join("/" + x for x in s)), TRAILING)
def test_replace_prefix_match_properties(prefix, rest, pslash, replacement, rslash):
    prefix_v = (prefix + pslash).encode()
    path = (prefix.rstrip("/") + (rest if rest != "/" else "")).encode() or b"/"
    out = replace_prefix_match(path, prefix_v, (replacement + rslash).encode())
    assert out.startswith(b"/") and b"//" not in out
    # the remainder after the prefix is preserved element by element
    suffix = path[len(prefix.rstrip("/").encode()):]
    expected = (replacement.encode() + suffix) or b"/"
    assert out == expected
    # replacing a prefix by itself is the identity
    assert replace_prefix_match(path, prefix_v, prefix_v) == path


MATCH = st.fixed_dictionaries({
    "kind": st.sampled_from(["Exact", "PathPrefix", "RegularExpression"]),
    "path": PATHS,
    "method": st.sampled_from([None, "GET", "POST"]),
    "headers": st.lists(st.sampled_from(["h1", "h2", "h3"]), unique=True, max_size=3),
    "query": st.lists(st.sampled_from(["q1", "q2"]), unique=True, max_size=2),
})


def _to_spec(m):
    value = m["path"] if m["kind"] != "RegularExpression" else m["path"] + ".*"
    spec = {"path": {"type": m["kind"], "value": value}}
    if m["method"]:
        spec["method"] = m["method"]
    if m["headers"]:
        spec["headers"] = [{"name": h, "value": "1"} for h in m["headers"]]
    if m["query"]:
        spec["queryParams"] = [{"name": q, "value": "1"} for q in m["query"]]
    return spec


def _oracle_matches(m, path, method, headers, query):
    import re as _re
    if m["kind"] == "Exact" and path != m["path"]:
        return False
    if m["kind"] == "PathPrefix" and not _segments_oracle(path, m["path"]):
        return False
    if m["kind"] == "RegularExpression" and not _re.fullmatch(_re.escape(m["path"]) + ".*", path):
        return False
    if m["method"] and m["method"] != method:
        return False
    return set(m["headers"]) <= headers and set(m["query"]) <= query


def _oracle_key(m, route_name, rule_idx):
    rank = {"Exact": 0, "PathPrefix": 1, "RegularExpression": 2}[m["kind"]]
    value = m["path"] if m["kind"] != "RegularExpression" else m["path"] + ".*"
    length = 0 if m["kind"] == "Exact" else len(value.rstrip("/") if m["kind"] == "PathPrefix" else value)
    return (rank, -length, 0 if m["method"] else 1, -len(m["headers"]), -len(m["query"]), f"shop/{route_name}", rule_idx)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(MATCH, min_size=1, max_size=4), min_size=1, max_size=2), PATHS,
       st.sampled_from(["GET", "POST"]), st.sets(st.sampled_from(["h1", "h2", "h3"])),
       st.sets(st.sampled_from(["q1", "q2"])))
def test_matching_equals_brute_force_precedence(routes, path, method, headers, query):
    """The compiled, sorted table picks what a brute-force scan with the spec's ordering picks."""
    config = [http_route(f"r{ri}", [{"matches": [_to_spec(m)], "backendRefs": [ref("web-v1")]} for m in rules])
              for ri, rules in enumerate(routes)]
    t = table(*config)
    qs = "&".join(f"{q}=1" for q in sorted(query))
    d = t.match(req(path + (f"?{qs}" if qs else ""), method, [(h, "1") for h in sorted(headers)]))
    candidates = [(_oracle_key(m, f"r{ri}", mi), f"r{ri}#{mi}")
                  for ri, rules in enumerate(routes) for mi, m in enumerate(rules)
                  if _oracle_matches(m, path, method, headers, query)]
    if not candidates:
        assert d is NO_ROUTE
    else:
        assert chosen(d) == min(candidates)[1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=4), st.integers(0, 2**32))
def test_weighted_choice_never_picks_weight_zero(weights, seed):
    names = ["web-v1", "web-v2", "web-v3", "mirror"]
    t = table(http_route("r", [rule(backends=[ref(n, w) for n, w in zip(names, weights)])]), rand=random.Random(seed))
    allowed = {n for n, w in zip(names, weights) if w > 0}
    for _ in range(30):
        d = t.match(req())
        if allowed:
            assert isinstance(d, RouteDecision) and d.backend.service.name in allowed
        else:
            assert isinstance(d, DirectResponse) and d.status == 500


def test_match_is_fast_enough():
    """A rough guard on the hot path: 20 routes x 3 matches, 20k matches well under a second."""
    import time
    rules = [rule({"path": {"value": f"/svc{i}"}, "headers": [{"name": "x", "value": str(i)}]},
                  {"path": {"type": "Exact", "value": f"/exact{i}"}},
                  {"path": {"type": "RegularExpression", "value": f"/re{i}/[0-9]+"}}) for i in range(20)]
    t = table(http_route("r", rules))
    router = t.router_for(WEB.cluster_ip, 80)
    hs = [(b"x", b"19"), (b"user-agent", b"curl")]
    start = time.process_time()  # CPU time: not disturbed by other processes on a shared machine
    for _ in range(20000):
        d = router.match(RequestInfo(b"GET", b"/svc19/items?id=1", hs))
    elapsed = time.process_time() - start
    assert chosen(d) == "r#19"
    assert elapsed < 1.0, elapsed
