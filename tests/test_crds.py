"""The hostmesh.io CRDs (controlplane/crds.py -> daemonset/base/crds.yaml): the committed file
is what the model generates, every CRD is a valid and structural apiextensions/v1 object,
the examples (real user objects) pass their schemas, and bad objects the model refuses are
refused by the schemas too."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from controlplane import crds
from controlplane.model import kinds
from controlplane.model.validate import Document, validate_document

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "daemonset" / "base" / "crds.yaml"
EXAMPLES = REPO / "examples" / "config"
K8S_VERSION = "1.30.0"   # the oldest Kubernetes the manifests are validated against
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")


def schemas() -> dict[str, dict]:
    return {c["spec"]["names"]["kind"]: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for c in crds.crds()}


def strict_validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(crds.strict(schemas()[kind]))


def test_the_committed_crds_are_what_the_model_generates():
    assert COMMITTED.read_text() == crds.render(), (
        "daemonset/base/crds.yaml is stale: regenerate it with "
        "`.venv/bin/python -m controlplane.crds > daemonset/base/crds.yaml`")


def test_one_crd_per_hostmesh_kind():
    want = {s.kind for s in kinds.KINDS.values() if s.api_version.startswith("hostmesh.io/")}
    docs = crds.crds()
    assert {c["spec"]["names"]["kind"] for c in docs} == want
    for c in docs:
        names = c["spec"]["names"]
        assert c["metadata"]["name"] == f"{names['plural']}.hostmesh.io"
        assert c["spec"]["scope"] == "Namespaced"
        assert [v["name"] for v in c["spec"]["versions"]] == ["v1alpha1"]


@pytest.mark.parametrize("doc", crds.crds(), ids=lambda c: c["spec"]["names"]["kind"])
def test_each_crd_is_a_valid_apiextensions_object(doc):
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _structural_problems(schema: dict, where: str, in_junctor: bool = False) -> list[str]:
    """The structural-schema rules the API server enforces (KEP 1002), as far as they
    apply to what the generator emits."""
    out = []
    int_or_string = schema.get("x-kubernetes-int-or-string")
    if in_junctor:
        for key in ("type", "description", "default", "additionalProperties", "nullable"):
            if key in schema and not (key == "type" and in_junctor == "int-or-string"):
                out.append(f"{where}: {key} inside a junctor")
    elif "type" not in schema and not int_or_string and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.append(f"{where}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        out.append(f"{where}: properties and additionalProperties together")
    if schema.get("additionalProperties") is False:
        out.append(f"{where}: additionalProperties: false")
    if "uniqueItems" in schema:
        out.append(f"{where}: uniqueItems is forbidden in CRDs")
    for name, sub in (schema.get("properties") or {}).items():
        out += _structural_problems(sub, f"{where}.{name}", in_junctor)
    if isinstance(schema.get("additionalProperties"), dict):
        out += _structural_problems(schema["additionalProperties"], f"{where}[*]", in_junctor)
    if "items" in schema:
        out += _structural_problems(schema["items"], f"{where}[]", in_junctor)
    outside = set(schema.get("properties") or {})
    for j in JUNCTORS:
        for i, sub in enumerate(([schema[j]] if j in schema else []) if j == "not" else schema.get(j, [])):
            mode = "int-or-string" if int_or_string and j == "anyOf" else True
            out += _structural_problems(sub, f"{where}.{j}[{i}]", mode)
            missing = set(sub.get("properties") or {}) - outside
            if missing:
                out.append(f"{where}.{j}[{i}]: properties {sorted(missing)} not specified outside the junctor")
    return out


@pytest.mark.parametrize("kind", sorted(schemas()))
def test_each_schema_is_structural_and_its_defaults_are_valid(kind):
    schema = schemas()[kind]
    assert _structural_problems(schema, kind) == []
    assert schema["properties"]["metadata"].keys() <= {"type", "properties"}

    def defaults(node, where):
        if "default" in node:
            body = {k: v for k, v in node.items() if k != "default"}
            jsonschema.Draft7Validator(body).validate(node["default"])
        for name, sub in (node.get("properties") or {}).items():
            defaults(sub, f"{where}.{name}")
        if "items" in node:
            defaults(node["items"], f"{where}[]")
    defaults(schema, kind)


def example_objects() -> list[dict]:
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(path.read_text()) if d and d["apiVersion"].startswith("hostmesh.io/")]
    return out


def test_the_examples_cover_most_hostmesh_kinds():
    assert {d["kind"] for d in example_objects()} >= {"Workload", "TrafficPolicy", "AuthorizationPolicy",
                                                      "PeerAuthentication", "MeshConfig"}


@pytest.mark.parametrize("obj", example_objects(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_the_examples_validate_against_their_crd(obj):
    strict_validator(obj["kind"]).validate(obj)


def _model_accepts(obj: dict) -> bool:
    return validate_document(Document("test.yaml", 1, obj)).obj is not None


def _example(kind: str) -> dict:
    return copy.deepcopy(next(d for d in example_objects() if d["kind"] == kind))


def _bad_objects() -> list[tuple[str, dict]]:
    """(why, object): each one is refused by the control plane's model."""
    out = []

    def bad(why: str, kind: str, edit) -> None:
        obj = _example(kind)
        edit(obj)
        out.append((why, obj))

    bad("unknown field", "Workload", lambda o: o["spec"].update(nodeName="node1"))
    bad("not an IPv4 address", "Workload", lambda o: o["spec"].update(address="198.18.1.256"))
    bad("port out of range", "Workload", lambda o: o["spec"]["ports"].append({"name": "x", "port": 70000}))
    bad("port name with --", "Workload", lambda o: o["spec"]["ports"].append({"name": "a--b", "port": 7}))
    bad("missing required field", "Workload", lambda o: o["spec"].pop("node"))
    bad("retries attempts above 100", "TrafficPolicy", lambda o: o["spec"].update(retries={"attempts": 101}))
    bad("retries without attempts", "TrafficPolicy", lambda o: o["spec"].update(retries={"retryOn": ["5xx"]}))
    bad("unknown retryOn", "TrafficPolicy", lambda o: o["spec"].update(retries={"attempts": 1, "retryOn": ["5xxx"]}))
    bad("outlier ejection without a trigger", "TrafficPolicy", lambda o: o["spec"].update(
        outlierDetection={"consecutive5xxErrors": 0, "consecutiveGatewayErrors": 0}))
    bad("maxEjectionPercent 101", "TrafficPolicy",
        lambda o: o["spec"].update(outlierDetection={"maxEjectionPercent": 101}))
    bad("rateLimit burst 0", "TrafficPolicy",
        lambda o: o["spec"].update(rateLimit={"requestsPerUnit": 1, "unit": "second", "burst": 0}))
    bad("maxRequests 0", "TrafficPolicy", lambda o: o["spec"]["connectionPool"].update(maxRequests=0))
    bad("no policy section", "TrafficPolicy", lambda o: [o["spec"].pop(k) for k in list(o["spec"]) if k != "targetRef"])
    bad("ringHash without RING_HASH", "TrafficPolicy",
        lambda o: o["spec"]["loadBalancer"].update(ringHash={"sourceIP": True}))
    bad("two ringHash keys", "TrafficPolicy",
        lambda o: o["spec"]["loadBalancer"].update(type="RING_HASH", ringHash={"sourceIP": True, "header": "x"}))
    bad("bad duration", "TrafficPolicy", lambda o: o["spec"]["connectionPool"].update(connectTimeout="2 seconds"))
    bad("empty connectionPool", "TrafficPolicy", lambda o: o["spec"].update(connectionPool={}))
    bad("action CUSTOM", "AuthorizationPolicy", lambda o: o["spec"].update(action="CUSTOM"))
    bad("wildcard in the middle", "AuthorizationPolicy",
        lambda o: o["spec"]["rules"][0]["from"][0]["source"].update(principals=["a*b"]))
    bad("empty matchLabels", "AuthorizationPolicy", lambda o: o["spec"].update(selector={"matchLabels": {}}))
    bad("mtls DISABLE", "PeerAuthentication", lambda o: o["spec"].update(mtls={"mode": "DISABLE"}))
    bad("portLevelMtls without selector", "PeerAuthentication",
        lambda o: o["spec"].update(portLevelMtls={"8080": {"mode": "STRICT"}}))
    bad("MeshConfig not named default", "MeshConfig", lambda o: o["metadata"].update(name="mesh"))
    bad("serviceCIDR too small", "MeshConfig", lambda o: o["spec"].update(serviceCIDR="10.0.0.0/30"))
    bad("REGISTRY_ONLY: not supported yet", "MeshConfig",
        lambda o: o["spec"].update(outboundTrafficPolicy={"mode": "REGISTRY_ONLY"}))
    bad("wrong type", "MeshConfig", lambda o: o["spec"].update(certificateTTL=3600))

    def bad_fault(why: str, **spec) -> None:
        spec = {"targetRef": {"kind": "Service", "name": "web"}, "abort": {"percentage": 10, "httpStatus": 503},
                **spec}
        out.append((why, {"apiVersion": "hostmesh.io/v1alpha1", "kind": "FaultInjection", "metadata": {"name": "f"},
                          "spec": {k: v for k, v in spec.items() if v is not None}}))

    bad_fault("FaultInjection abort percentage 150", abort={"percentage": 150, "httpStatus": 503})
    bad_fault("FaultInjection neither delay nor abort", abort=None)
    bad_fault("FaultInjection targetRef Deployment", targetRef={"group": "apps", "kind": "Deployment", "name": "web"})
    bad_fault("FaultInjection HTTPRoute without its group", targetRef={"kind": "HTTPRoute", "name": "web"})
    bad_fault("FaultInjection Service in the route group",
              targetRef={"group": "gateway.networking.k8s.io", "kind": "Service", "name": "web"})
    bad_fault("FaultInjection Service name not a DNS-1035 label", targetRef={"kind": "Service", "name": "web.v1"})
    bad_fault("FaultInjection empty headers", headers=[])
    return out


@pytest.mark.parametrize("why,obj", _bad_objects(), ids=[w for w, _ in _bad_objects()])
def test_bad_objects_are_refused_by_the_model_and_by_the_crd(why, obj):
    assert not _model_accepts(obj), why   # the case really is one the control plane refuses
    errors = list(strict_validator(obj["kind"]).iter_errors(obj))
    assert errors, f"the {obj['kind']} CRD accepts an object the model refuses ({why})"


def test_the_examples_are_accepted_by_the_model_too():
    for obj in example_objects():
        assert _model_accepts(obj), obj["metadata"]["name"]


def test_a_check_the_generator_does_not_know_is_an_error_not_a_silent_gap():
    from controlplane.model import fields as f
    obj = f.Obj({"a": f.Int()}, checks=[lambda out, raw, path, problems: None])
    with pytest.raises(crds.SchemaError, match="map it in CHECK_SCHEMAS or list it in UNEXPRESSED_CHECKS"):
        crds.schema_of(obj)
    with pytest.raises(crds.SchemaError, match="CHECK_FN_SCHEMAS"):
        crds.schema_of(f.Str(check_fn=lambda v: None))


def test_the_module_entry_point_prints_the_crds(capsys):
    assert crds.main() == 0
    out = capsys.readouterr().out
    assert out == crds.render() and out.startswith("# Generated by")


GOOD = [
    {"apiVersion": "hostmesh.io/v1alpha1", "kind": "TrafficPolicy", "metadata": {"name": "hash"},
     "spec": {"targetRef": {"kind": "Service", "name": "web"},
              "loadBalancer": {"type": "RING_HASH", "ringHash": {"header": "x-user"}}, "timeout": "1h30m"}},
    {"apiVersion": "hostmesh.io/v1alpha1", "kind": "RequestAuthentication", "metadata": {"name": "jwt"},
     "spec": {"selector": {"matchLabels": {"app": "web"}},
              "jwtRules": [{"issuer": "https://issuer.example", "jwksUri": "https://issuer.example/jwks",
                            "audiences": ["web"], "fromHeaders": [{"name": "authorization", "prefix": "Bearer "}]}]}},
    {"apiVersion": "hostmesh.io/v1alpha1", "kind": "PeerAuthentication", "metadata": {"name": "ports"},
     "spec": {"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}},
    {"apiVersion": "hostmesh.io/v1alpha1", "kind": "AuthorizationPolicy", "metadata": {"name": "deny"},
     "spec": {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8", "192.168.1.1"]}}],
                                           "when": [{"key": "request.headers[x-debug]", "values": ["*"]}]}]}},
    {"apiVersion": "hostmesh.io/v1alpha1", "kind": "TrafficPolicy", "metadata": {"name": "full"},
     "spec": {"targetRef": {"kind": "Service", "name": "web"},
              "connectionPool": {"maxRequests": 100, "maxRetries": 3},
              "outlierDetection": {"consecutive5xxErrors": 0, "consecutiveGatewayErrors": 3, "interval": "5s",
                                   "baseEjectionTime": "30s", "maxEjectionPercent": 100},
              "timeout": "10s",
              "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": ["5xx", "retriable-status-codes"],
                          "retriableStatusCodes": [503], "backoff": {"baseInterval": "25ms", "maxInterval": "1s"},
                          "retryNonIdempotent": False, "budget": {"percent": 20, "minRetryConcurrency": 3}},
              "rateLimit": {"requestsPerUnit": 100, "unit": "second", "burst": 200, "perSourceWorkload": True}}},
    {"apiVersion": "hostmesh.io/v1alpha1", "kind": "FaultInjection", "metadata": {"name": "svc"},
     "spec": {"targetRef": {"kind": "Service", "name": "web"}, "delay": {"percentage": 0.5, "fixedDelay": "1s"}}},
    {"apiVersion": "hostmesh.io/v1alpha1", "kind": "FaultInjection", "metadata": {"name": "route"},
     "spec": {"targetRef": {"group": "gateway.networking.k8s.io", "kind": "GRPCRoute", "name": "web.v1"},
              "abort": {"percentage": 100, "grpcStatus": 14},
              "headers": [{"name": "x-fault", "value": "abort"}]}},
    {"apiVersion": "hostmesh.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "default"}},
    {"apiVersion": "hostmesh.io/v1alpha1", "kind": "Workload", "metadata": {"name": "w", "namespace": "ns"},
     "spec": {"node": "node-1.example", "address": "10.244.1.5"}},
]


@pytest.mark.parametrize("obj", GOOD, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_objects_the_model_accepts_pass_their_crd(obj):
    assert _model_accepts(obj)
    strict_validator(obj["kind"]).validate(obj)
