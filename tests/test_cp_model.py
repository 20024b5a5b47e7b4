"""The config model: round-trips, defaults, equality, clusterIP allocation, non-YAML sources."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import yaml

from controlplane.model import (
    Document,
    MeshModel,
    MeshSettings,
    format_duration,
    load_texts,
    parse_duration,
    validate_documents,
)
from controlplane.model.loader import split_documents
from controlplane.sources import load_directory
from nodeagent.state import ConfigObject

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "config"


def texts(d: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(d.glob("*.yaml"))}


def load_ok(files: dict[str, str]) -> MeshModel:
    result = load_texts(files)
    assert [str(e) for e in result.errors] == []
    return result.model


def svc(name: str, *, ns: str = "default", cluster_ip: str | None = None, selector: str = "{}",
        ports: str = "[{port: 80}]") -> str:
    ip = f"  clusterIP: {cluster_ip}\n" if cluster_ip else ""
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n{ip}  selector: {selector}\n  ports: {ports}\n")


# ---------------------------------------------------------------- the examples

def test_examples_load_and_reload_to_an_equal_model():
    first = load_directory(str(EXAMPLES))
    assert first.errors == [] and first.warnings == []
    again = load_directory(str(EXAMPLES))
    assert again.model == first.model
    assert hash(again.model) == hash(first.model)
    assert again.model.version == first.model.version
    assert first.model.counts() == {"AuthorizationPolicy": 1, "FaultInjection": 1, "HTTPRoute": 1, "MeshConfig": 1,
                                    "PeerAuthentication": 1, "RequestAuthentication": 1, "Service": 2,
                                    "Telemetry": 1, "TrafficPolicy": 1, "Workload": 4}


def test_model_round_trips_through_documents():
    """model -> Kubernetes-shaped documents -> YAML -> model gives the same model."""
    model = load_directory(str(EXAMPLES)).model
    dumped = yaml.safe_dump_all(model.to_documents(), sort_keys=False)
    assert load_ok({"all.yaml": dumped}) == model


def test_file_layout_does_not_change_the_model():
    files = texts(EXAMPLES)
    model = load_ok(files)
    docs = [d for text in files.values() for d in text.split("\n---\n")]
    one_file = load_ok({"everything.yaml": "\n---\n".join(reversed(docs))})
    assert one_file == model and one_file.version == model.version
    # where an object came from is kept for messages but is not part of equality
    assert {o.source.file for o in one_file} == {"everything.yaml"}


def test_config_objects_carry_canonical_spec_json():
    model = load_directory(str(EXAMPLES)).model
    cos = model.config_objects()
    assert [(c.kind, c.namespace, c.name) for c in cos] == [
        ("AuthorizationPolicy", "default", "web-api"), ("FaultInjection", "default", "web-chaos"),
        ("HTTPRoute", "default", "web-canary-split"),
        ("MeshConfig", "default", "default"), ("PeerAuthentication", "default", "default"),
        ("RequestAuthentication", "default", "web-jwt"), ("Telemetry", "default", "web"),
        ("TrafficPolicy", "default", "web")]
    route = model.get("HTTPRoute", "default", "web-canary-split")
    assert cos[2] == ConfigObject("HTTPRoute", "default", "web-canary-split", route.spec_json)
    spec = json.loads(cos[2].spec)
    assert cos[2].spec == json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # Gateway API defaults are filled in, so agents need not know them
    assert spec["parentRefs"] == [{"group": "", "kind": "Service", "name": "web", "namespace": "default", "port": 80}]
    assert spec["rules"][0]["matches"] == [{"headers": [{"name": "x-canary", "type": "Exact", "value": "always"}],
                                            "path": {"type": "PathPrefix", "value": "/"}}]
    assert spec["rules"][0]["backendRefs"] == [{"group": "", "kind": "Service", "name": "web-canary",
                                                "namespace": "default", "port": 80, "weight": 1}]
    assert spec["rules"][1]["timeouts"] == {"request": "10s", "backendRequest": "3s"}


def test_defaults_for_service_workload_and_meshconfig():
    model = load_ok({"a.yaml": svc("api", ports="[{port: 8080}]") + "---\n" +
                     "apiVersion: hostmesh.io/v1alpha1\nkind: Workload\nmetadata: {name: w}\n"
                     "spec: {node: n1, address: 10.0.0.1}\n"})
    api = model.get("Service", "default", "api").spec
    assert api["type"] == "ClusterIP" and api["selector"] == {}
    assert api["ports"] == [{"port": 8080, "targetPort": 8080, "protocol": "TCP"}]
    assert ipaddress.IPv4Address(api["clusterIP"]) in ipaddress.IPv4Network("198.19.0.0/16")
    assert model.get("Workload", "default", "w").spec == {"node": "n1", "address": "10.0.0.1",
                                                          "serviceAccount": "default", "ports": []}
    # no MeshConfig object: the defaults are in force and carried to agents
    assert model.settings == MeshSettings("cluster.local", "198.19.0.0/16", "24h", "ALLOW_ANY")
    mesh = [c for c in model.config_objects() if c.kind == "MeshConfig"]
    assert mesh == [ConfigObject("MeshConfig", "default", "default",
                                 '{"certificateTTL":"24h","outboundTrafficPolicy":{"mode":"ALLOW_ANY"},'
                                 '"pathNormalization":{"escapedSlashes":"REJECT"},"serviceCIDR":"198.19.0.0/16","trustDomain":"cluster.local"}')]
    assert model.settings.certificate_ttl_seconds == 86400


def test_objects_are_immutable_and_models_hashable():
    model = load_directory(str(EXAMPLES)).model
    web = model.get("Service", "default", "web")
    spec = web.spec
    spec["ports"].clear()
    assert web.spec["ports"]            # a copy was changed, not the object
    with pytest.raises(AttributeError):
        web.name = "other"              # frozen
    assert len({model, load_directory(str(EXAMPLES)).model}) == 1
    assert web.ref == "Service default/web" and model.mesh_config.ref == "MeshConfig default/default"


def test_every_kind_loads_with_its_options():
    files = {"all.yaml": """\
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec:
  clusterIP: 198.19.5.5
  selector: {app: echo}
  ports:
  - {name: grpc, port: 9090, targetPort: grpc, appProtocol: grpc}
---
apiVersion: hostmesh.io/v1alpha1
kind: Workload
metadata: {name: echo-1, namespace: shop, labels: {app: echo}}
spec: {node: vm-1.example.com, address: 10.1.0.5, serviceAccount: echo, ports: [{name: grpc, port: 50051}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, sectionName: grpc}]
  rules:
  - matches:
    - method: {service: echo.Echo, method: Say}
      headers: [{name: x-tenant, value: a}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: echo, port: 9090}, fraction: {numerator: 1, denominator: 1000}}
    backendRefs: [{name: echo, port: 9090}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rewrite, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  hostnames: ["*.shop.example.com"]
  rules:
  - name: api
    matches:
    - path: {type: PathPrefix, value: /api}
      queryParams: [{name: debug, value: "1"}]
      method: GET
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-served-by, value: hostmesh}], remove: [server]}
    backendRefs: [{name: echo, port: 9090, filters: [{type: RequestHeaderModifier,
                   requestHeaderModifier: {set: [{name: x-a, value: b}]}}]}]
  - matches: [{path: {type: Exact, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301, port: 443}}]
---
apiVersion: hostmesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: echo, namespace: shop}
spec:
  targetRef: {group: "", kind: Service, name: echo}
  loadBalancer: {type: RING_HASH, ringHash: {sourceIP: true}}
  timeout: 1h30m
---
apiVersion: hostmesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo, namespace: shop}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - from: [{source: {notNamespaces: [shop], ipBlocks: [10.0.0.0/8, 192.168.1.1]}}]
    to: [{operation: {ports: [9090]}}]
    when: [{key: source.principal, notValues: ["cluster.local/ns/shop/*"]}]
---
apiVersion: hostmesh.io/v1alpha1
kind: PeerAuthentication
metadata: {name: echo, namespace: shop}
spec:
  selector: {matchLabels: {app: echo}}
  mtls: {mode: STRICT}
  portLevelMtls: {9090: {mode: PERMISSIVE}}
---
apiVersion: hostmesh.io/v1alpha1
kind: MeshConfig
metadata: {name: default}
spec:
  trustDomain: example.org
  serviceCIDR: 198.19.0.0/16
  certificateTTL: 1h
  outboundTrafficPolicy: {mode: ALLOW_ANY}
"""}
    model = load_ok(files)
    assert len(model) == 8
    assert model.get("AuthorizationPolicy", "shop", "echo").spec["rules"][0]["from"][0]["source"]["ipBlocks"] == [
        "10.0.0.0/8", "192.168.1.1"]
    assert model.get("PeerAuthentication", "shop", "echo").spec["portLevelMtls"] == {"9090": {"mode": "PERMISSIVE"}}
    redirect = model.get("HTTPRoute", "shop", "rewrite").spec["rules"][1]["filters"][0]["requestRedirect"]
    assert redirect == {"scheme": "https", "statusCode": 301, "port": 443}
    assert model.settings.trust_domain == "example.org" and model.settings.certificate_ttl_seconds == 3600


# ---------------------------------------------------------------- accepted means enforced

_NOT_YET = [
    ("MeshConfig", "spec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
     "spec.outboundTrafficPolicy.mode", "the agents capture only the mesh's own CIDRs"),
]


@pytest.mark.parametrize("kind, spec, path, why", _NOT_YET, ids=[f"{k}-{p}" for k, _, p, _ in _NOT_YET])
def test_settings_no_agent_enforces_are_refused_not_ignored(kind, spec, path, why):
    name = "default" if kind == "MeshConfig" else "p"   # MeshConfig is a singleton named default
    doc = f"apiVersion: hostmesh.io/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop}}\n{spec}"
    result = load_texts({"p.yaml": svc("echo", ns="shop") + "---\n" + doc})
    assert result.model is None
    messages = [str(e) for e in result.errors]
    assert len(messages) == 1, messages
    assert f"{kind} shop/{name}: {path}: not supported yet: " in messages[0] and why in messages[0], messages


_NOW_ENFORCED = [
    ("AuthorizationPolicy", "spec:\n  rules: [{to: [{operation: {methods: [GET], notPaths: [/admin/*], "
                            "hosts: ['*.shop'], paths: [/public/*]}}], "
                            "from: [{source: {requestPrincipals: ['*'], notRequestPrincipals: [x/y]}}], "
                            "when: [{key: 'request.headers[x-user]', values: [a]}, "
                            "{key: 'request.auth.claims[groups]', values: [admins]}, "
                            "{key: 'request.auth.claims[org][team]', notValues: [x]}, "
                            "{key: request.auth.principal, values: ['*']}, "
                            "{key: request.auth.audiences, values: [shop]}, "
                            "{key: request.auth.presenter, values: [app]}]}]\n"),
    ("RequestAuthentication", "spec:\n  jwtRules: [{issuer: https://auth.example.com, "
                              "jwksUri: https://auth.example.com/keys, fromParams: [token], "
                              "fromHeaders: [{name: x-jwt, prefix: 'Bearer '}], forwardOriginalToken: true, "
                              "outputPayloadToHeader: x-jwt-payload, "
                              "outputClaimToHeaders: [{header: x-sub, claim: sub}], audiences: [shop]}]\n"),
    ("MeshConfig", "spec:\n  pathNormalization: {escapedSlashes: KEEP_UNCHANGED}\n"),
]


@pytest.mark.parametrize("kind, spec", _NOW_ENFORCED, ids=[k for k, _ in _NOW_ENFORCED])
def test_request_checks_are_accepted_and_carried_to_agents(kind, spec):
    name = "default" if kind == "MeshConfig" else "p"
    doc = f"apiVersion: hostmesh.io/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop}}\n{spec}"
    model = load_ok({"p.yaml": svc("echo", ns="shop") + "---\n" + doc})
    carried = {(c.kind, c.name): json.loads(c.spec) for c in model.config_objects()}
    raw = yaml.safe_load(doc)["spec"]
    got = carried[(kind, name)]
    for key, value in raw.items():
        if kind == "RequestAuthentication":
            assert got[key][0] | value[0] == got[key][0]  # every field as written (defaults added)
        elif isinstance(value, dict):
            assert got[key] == value
        else:
            assert got[key] == value, key


def test_meshconfig_path_normalization_defaults_to_reject():
    model = load_ok({"p.yaml": svc("echo")})
    mesh = [json.loads(c.spec) for c in model.config_objects() if c.kind == "MeshConfig"][0]
    assert mesh["pathNormalization"] == {"escapedSlashes": "REJECT"}


def test_refused_settings_still_report_their_other_mistakes():
    """NotSupportedYet checks the value it refuses, so the operator sees every mistake at once."""
    from controlplane.model.fields import Int, NotSupportedYet, Obj, Problems
    field = Obj({"x": NotSupportedYet(Obj({"attempts": Int(0, 100)}), "no agent does x yet")})
    problems = Problems()
    field.check({"x": {"attempts": -1}}, ("spec",), problems)
    assert problems.items == [(("spec", "x", "attempts"), "-1 is not between 0 and 100"),
                              (("spec", "x"), "not supported yet: no agent does x yet")]


# ---------------------------------------------------------------- retries, outlier detection, rate limits, faults

FULL_TRAFFIC_POLICY = """\
apiVersion: hostmesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: p, namespace: shop}
spec:
  targetRef: {kind: Service, name: echo}
  loadBalancer: {type: LEAST_REQUEST, preferSameNode: true}
  connectionPool: {maxConnections: 100, maxPendingRequests: 10, maxRequestsPerConnection: 50,
                   maxRequests: 200, maxRetries: 3, connectTimeout: 1s}
  outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 0, interval: 5s,
                     baseEjectionTime: 1m, maxEjectionPercent: 50}
  timeout: 10s
  retries:
    attempts: 3
    perTryTimeout: 2s
    retryOn: [5xx, reset, retriable-status-codes]
    retriableStatusCodes: [409, 503]
    backoff: {baseInterval: 25ms, maxInterval: 250ms}
    retryNonIdempotent: true
    budget: {percent: 20.5, minRetryConcurrency: 3}
  rateLimit: {requestsPerUnit: 100, unit: minute, burst: 20, perSourceWorkload: true}
"""


def test_a_traffic_policy_with_every_field_is_accepted_and_carried_as_written():
    model = load_ok({"p.yaml": svc("echo", ns="shop") + "---\n" + FULL_TRAFFIC_POLICY})
    carried = {(c.kind, c.name): json.loads(c.spec) for c in model.config_objects()}
    assert carried[("TrafficPolicy", "p")] == {**yaml.safe_load(FULL_TRAFFIC_POLICY)["spec"],
                                               "targetRef": {"group": "", "kind": "Service", "name": "echo"}}


def test_traffic_policy_defaults_the_agents_receive():
    """The spec carried to agents is the normalized one: the model's defaults are filled in;
    outlierDetection's defaults are the agents' (absent here)."""
    doc = ("apiVersion: hostmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n"
           "  targetRef: {kind: Service, name: echo}\n  retries: {attempts: 2}\n"
           "  rateLimit: {requestsPerUnit: 7, unit: second}\n  outlierDetection: {}\n")
    model = load_ok({"p.yaml": svc("echo", ns="shop") + "---\n" + doc})
    spec = json.loads(next(c.spec for c in model.config_objects() if c.kind == "TrafficPolicy"))
    assert spec == {"targetRef": {"group": "", "kind": "Service", "name": "echo"},
                    "retries": {"attempts": 2, "retryNonIdempotent": False},
                    "rateLimit": {"requestsPerUnit": 7, "unit": "second", "burst": 7, "perSourceWorkload": False},
                    "outlierDetection": {}}


ROUTE = ("apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop}}\n"
         "spec:\n  parentRefs: [{{group: '', kind: Service, name: echo}}]\n")


def fault(target: str, rest: str = "abort: {percentage: 10, httpStatus: 503}\n", name: str = "f") -> str:
    return (f"apiVersion: hostmesh.io/v1alpha1\nkind: FaultInjection\nmetadata: {{name: {name}, namespace: shop}}\n"
            f"spec:\n  targetRef: {target}\n" + "".join(f"  {line}\n" for line in rest.splitlines()))


def test_fault_injection_on_a_service_is_accepted_and_carried():
    doc = fault("{kind: Service, name: echo}", "delay: {percentage: 0.5, fixedDelay: 200ms}\n"
                                               "abort: {percentage: 10, grpcStatus: 14}\n")
    model = load_ok({"p.yaml": svc("echo", ns="shop") + "---\n" + doc})
    spec = json.loads(next(c.spec for c in model.config_objects() if c.kind == "FaultInjection"))
    assert spec == {"targetRef": {"group": "", "kind": "Service", "name": "echo"},
                    "delay": {"percentage": 0.5, "fixedDelay": "200ms"}, "abort": {"percentage": 10, "grpcStatus": 14}}


@pytest.mark.parametrize("kind", ["HTTPRoute", "GRPCRoute"])
def test_fault_injection_on_a_route_with_headers_is_accepted_and_carried(kind):
    doc = fault(f"{{group: gateway.networking.k8s.io, kind: {kind}, name: r}}",
                "abort: {percentage: 100, httpStatus: 503}\n"
                "headers: [{name: x-fault, value: abort}, {name: X-Tenant, value: test}]\n")
    model = load_ok({"p.yaml": "---\n".join([svc("echo", ns="shop"), ROUTE.format(kind=kind, name="r"), doc])})
    spec = json.loads(next(c.spec for c in model.config_objects() if c.kind == "FaultInjection"))
    assert spec["targetRef"] == {"group": "gateway.networking.k8s.io", "kind": kind, "name": "r"}
    assert spec["headers"] == [{"name": "x-fault", "value": "abort"}, {"name": "X-Tenant", "value": "test"}]


def _errors(*docs: str) -> list[str]:
    result = load_texts({"p.yaml": "---\n".join(docs)})
    assert result.model is None
    return [str(e) for e in result.errors]


def test_fault_injection_on_a_tcp_only_service_is_refused_as_traffic_policy_is():
    tcp = svc("echo", ns="shop", ports="[{port: 5432, appProtocol: tcp}]")
    assert _errors(tcp, fault("{kind: Service, name: echo}")) == [
        "p.yaml:12: FaultInjection shop/f: spec.targetRef: not supported yet: a FaultInjection acts on HTTP traffic, "
        "and every port of Service shop/echo is relayed as TCP (appProtocol tcp); faults are injected into HTTP "
        "requests only"]


def test_fault_injection_route_target_must_exist_in_its_namespace():
    other = ROUTE.format(kind="HTTPRoute", name="r").replace("namespace: shop", "namespace: other").replace(
        "name: echo}", "name: echo, namespace: shop}")
    assert _errors(svc("echo", ns="shop"), other, ROUTE.format(kind="GRPCRoute", name="r"),
                   fault("{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}")) == [
        "p.yaml:24: FaultInjection shop/f: spec.targetRef.name: HTTPRoute shop/r does not exist"]


def test_one_fault_injection_per_target():
    target = "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}"
    assert _errors(svc("echo", ns="shop"), ROUTE.format(kind="HTTPRoute", name="r"),
                   fault(target), fault(target, name="g")) == [
        "p.yaml:25: FaultInjection shop/g: spec.targetRef: HTTPRoute shop/r is already targeted by "
        "FaultInjection shop/f (p.yaml:14); one FaultInjection per HTTPRoute"]


# ---------------------------------------------------------------- clusterIP allocation

def test_allocation_is_deterministic_and_avoids_explicit_ips():
    files = {"s.yaml": "---\n".join(svc(f"s{i}") for i in range(20)) + "---\n" + svc("pinned", cluster_ip="198.19.0.10")}
    a, b = load_ok(files), load_ok(dict(reversed(list(files.items()))))
    ips = {o.name: o.spec["clusterIP"] for o in a.services}
    assert ips == {o.name: o.spec["clusterIP"] for o in b.services}
    assert len(set(ips.values())) == 21 and ips["pinned"] == "198.19.0.10"
    net = ipaddress.IPv4Network("198.19.0.0/16")
    assert all(ipaddress.IPv4Address(ip) in net for ip in ips.values())


def test_adding_a_service_does_not_renumber_the_others():
    base = {f"s{i}.yaml": svc(f"s{i}") for i in range(10)}
    before = {o.name: o.spec["clusterIP"] for o in load_ok(base).services}
    after = {o.name: o.spec["clusterIP"] for o in load_ok({**base, "a.yaml": svc("aaa-first")}).services}
    assert {k: after[k] for k in before} == before


def test_allocation_uses_the_meshconfig_cidr_and_reports_exhaustion():
    mesh = "apiVersion: hostmesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {serviceCIDR: 10.96.0.0/28}\n"
    model = load_ok({"m.yaml": mesh, "s.yaml": "---\n".join(svc(f"s{i}") for i in range(14))})
    assert all(ipaddress.IPv4Address(o.spec["clusterIP"]) in ipaddress.IPv4Network("10.96.0.0/28")
               for o in model.services)
    result = load_texts({"m.yaml": mesh, "s.yaml": "---\n".join(svc(f"s{i:02}") for i in range(15))})
    assert [str(e) for e in result.errors] == [
        ("s.yaml:102: Service default/s14: spec: no free address left in the service CIDR 10.96.0.0/28 "
         "(MeshConfig spec.serviceCIDR) to allocate a clusterIP")]


# ---------------------------------------------------------------- warnings, other sources, helpers

def test_selected_workload_without_the_named_port_is_a_warning():
    files = {"a.yaml": svc("web", selector="{app: web}", ports="[{port: 80, targetPort: http}]") + """\
---
apiVersion: hostmesh.io/v1alpha1
kind: Workload
metadata: {name: w1, labels: {app: web}}
spec: {node: n1, address: 10.0.0.1, ports: [{name: http, port: 8080}]}
---
apiVersion: hostmesh.io/v1alpha1
kind: Workload
metadata: {name: w2, labels: {app: web}}
spec: {node: n1, address: 10.0.0.2}
"""}
    result = load_texts(files)
    assert result.errors == [] and result.model is not None
    assert [str(w) for w in result.warnings] == [
        ('a.yaml:6: Service default/web: spec.ports[0].targetPort: selected Workload(s) without a port named "http" '
         "get no endpoint: default/w2")]


def test_documents_from_a_non_yaml_source():
    """Sources without line numbers (Kubernetes, etcd) build Documents directly."""
    good = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"}, "spec": {"ports": [{"port": 80}]}}
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": 0}]}}
    ok = validate_documents([Document("etcd:/hostmesh/services/api", 1, good)])
    assert ok.model is not None and ok.model.get("Service", "default", "api") is not None
    result = validate_documents([Document("etcd:/hostmesh/services/x", 1, bad)])
    assert [str(e) for e in result.errors] == [
        "etcd:/hostmesh/services/x: Service default/x: spec.ports[0].port: 0 is not a valid port (1-65535)"]


def test_empty_documents_and_comment_only_files_are_skipped():
    model = load_ok({"a.yaml": "# nothing yet\n", "b.yaml": "---\n---\n" + svc("api") + "---\n"})
    assert [o.name for o in model] == ["api"]


def test_split_documents_keeps_directives_and_line_offsets():
    text = "%YAML 1.1\n---\na: 1\n---\nb: 2\n--- # third\nc: 3\n"
    assert split_documents(text) == [(0, "%YAML 1.1\n---\na: 1\n"), (3, "---\nb: 2\n"), (5, "--- # third\nc: 3\n")]


@pytest.mark.parametrize("text,seconds", [("10s", 10), ("500ms", 0.5), ("1h30m", 5400), ("0s", 0), ("1m1s1ms", 61.001)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10", "1.5s", "-1s", "1d", "123456s", "1s1s1s1s1s", ""])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration():
    assert [format_duration(s) for s in (60, 3600, 90, 0.25)] == ["1m", "1h", "90s", "250ms"]


def test_crlf_files_split_and_report_lines():
    text = svc("a").replace("\n", "\r\n") + "---\r\n" + svc("b", ports="[{port: 0}]").replace("\n", "\r\n")
    result = load_texts({"w.yaml": text})
    assert [str(e) for e in result.errors] == [
        "w.yaml:13: Service default/b: spec.ports[0].port: 0 is not a valid port (1-65535)"]


@pytest.mark.parametrize("protocols, refused", [
    (["tcp"], True), (["tls", "https"], True), (["tcp", "http"], False), ([None], False), (["grpc"], False)])
def test_traffic_policy_on_a_service_with_no_http_port_is_refused(protocols, refused):
    ports = ", ".join(f"{{name: p{i}, port: {8000 + i}" + (f", appProtocol: {ap}}}" if ap else "}")
                      for i, ap in enumerate(protocols))
    policy = ("apiVersion: hostmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n"
              "  targetRef: {kind: Service, name: db}\n  loadBalancer: {type: RANDOM}\n")
    result = load_texts({"p.yaml": svc("db", ports=f"[{ports}]") + "---\n" + policy})
    messages = [str(e) for e in result.errors]
    if not refused:
        assert messages == []
        return
    assert len(messages) == 1 and "spec.loadBalancer: not supported yet: loadBalancer acts on HTTP traffic" \
        in messages[0] and "on TCP ports a TrafficPolicy applies connectionRateLimit, healthCheck" in messages[0], messages


TCP_POLICY = ("apiVersion: hostmesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n"
              "  targetRef: {kind: Service, name: db}\n  connectionRateLimit: {connectionsPerUnit: 20, unit: minute}\n")


def test_a_connection_rate_limit_is_accepted_on_a_tcp_only_service_with_its_defaults():
    model = load_ok({"p.yaml": svc("db", ns="shop", ports="[{port: 5432, appProtocol: tcp}]") + "---\n" + TCP_POLICY})
    spec = json.loads(next(c.spec for c in model.config_objects() if c.kind == "TrafficPolicy"))
    assert spec["connectionRateLimit"] == {"connectionsPerUnit": 20, "unit": "minute", "burst": 20,
                                           "perSourceWorkload": False}


def test_a_health_check_is_accepted_on_a_tcp_only_service():
    doc = TCP_POLICY + "  healthCheck: {tcp: {}, interval: 2s, panicThreshold: 30}\n"
    model = load_ok({"p.yaml": svc("db", ns="shop", ports="[{port: 5432, appProtocol: tcp}]") + "---\n" + doc})
    spec = json.loads(next(c.spec for c in model.config_objects() if c.kind == "TrafficPolicy"))
    assert spec["healthCheck"]["tcp"] == {} and spec["healthCheck"]["panicThreshold"] == 30


def test_http_sections_next_to_a_connection_rate_limit_on_a_tcp_only_service_are_each_refused():
    doc = TCP_POLICY + "  timeout: 5s\n  retries: {attempts: 2}\n"
    assert [e.split(": not supported yet")[0] for e in
            _errors(svc("db", ns="shop", ports="[{port: 5432, appProtocol: tcp}]"), doc)] == [
        "p.yaml:14: TrafficPolicy shop/p: spec.timeout", "p.yaml:15: TrafficPolicy shop/p: spec.retries"]


@pytest.mark.parametrize("body, message", [
    ("{connectionsPerUnit: 0, unit: second}", "spec.connectionRateLimit.connectionsPerUnit: 0 is not between 1 and"),
    ("{connectionsPerUnit: 5, unit: day}", "spec.connectionRateLimit.unit:"),
    ("{connectionsPerUnit: 5, unit: second, burst: 0}", "spec.connectionRateLimit.burst: 0 is not between 1 and"),
    ("{unit: second}", "spec.connectionRateLimit.connectionsPerUnit:"),
])
def test_bad_connection_rate_limits_are_refused_with_their_path(body, message):
    doc = TCP_POLICY.replace("{connectionsPerUnit: 20, unit: minute}", body)
    errors = _errors(svc("db", ns="shop", ports="[{port: 5432, appProtocol: tcp}]"), doc)
    assert len(errors) == 1 and message in errors[0], errors
