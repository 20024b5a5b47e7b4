"""The access log config in the model: MeshConfig accessLog and the Telemetry kind (accepted,
carried to agents as written, and every bad input refused with its field path)."""

from __future__ import annotations

import json

import pytest

from controlplane.model import load_texts
from controlplane.model.fields import NOT_SUPPORTED_YET
from tests.test_cp_model import ROUTE, load_ok, svc


def meshconfig(access_log: str = "{output: stdout}", ns: str = "mesh-root") -> str:
    return (f"apiVersion: hostmesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {{name: default, namespace: {ns}}}\n"
            f"spec:\n  accessLog: {access_log}\n")


def telemetry(body: str, name: str = "t", ns: str = "shop") -> str:
    return (f"apiVersion: hostmesh.io/v1alpha1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n" + "".join(f"  {line}\n" for line in body.splitlines()))


def errors(*docs: str) -> list[str]:
    result = load_texts({"p.yaml": "---\n".join(docs)})
    assert result.model is None
    return [str(e) for e in result.errors]


def carried(model, kind: str) -> list[dict]:
    return [json.loads(c.spec) for c in model.config_objects() if c.kind == kind]


# ---------------------------------------------------------------- accepted
def test_meshconfig_access_log_defaults_to_every_line_and_is_carried():
    model = load_ok({"m.yaml": meshconfig("{output: /var/log/hostmesh/access.log}")})
    assert carried(model, "MeshConfig")[0]["accessLog"] == {"output": "/var/log/hostmesh/access.log",
                                                            "samplingPercentage": 100}
    model = load_ok({"m.yaml": meshconfig("{output: stdout, samplingPercentage: 2.5}")})
    assert carried(model, "MeshConfig")[0]["accessLog"] == {"output": "stdout", "samplingPercentage": 2.5}


def test_no_access_log_by_default():
    model = load_ok({"m.yaml": "apiVersion: hostmesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\n"})
    assert "accessLog" not in carried(model, "MeshConfig")[0]


@pytest.mark.parametrize("scope", [
    "selector: {matchLabels: {app: web}}",
    "targetRef: {kind: Service, name: echo}",
    "targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}",
    "targetRef: {group: gateway.networking.k8s.io, kind: GRPCRoute, name: g}",
    "",  # the namespace
], ids=["selector", "service", "httproute", "grpcroute", "namespace"])
def test_telemetry_scopes_are_accepted_and_carried(scope):
    model = load_ok({"p.yaml": "---\n".join([
        meshconfig(), svc("echo", ns="shop"), ROUTE.format(kind="HTTPRoute", name="r"),
        ROUTE.format(kind="GRPCRoute", name="g"),
        telemetry(f"{scope}\naccessLogging: {{samplingPercentage: 10}}")])})
    (spec,) = carried(model, "Telemetry")
    assert spec["accessLogging"] == {"disabled": False, "samplingPercentage": 10}
    if scope.startswith("targetRef"):
        assert spec["targetRef"]["name"] in ("echo", "r", "g")


def test_a_disabled_telemetry_is_carried_with_its_default():
    model = load_ok({"p.yaml": "---\n".join([meshconfig(), telemetry("accessLogging: {disabled: true}")])})
    assert carried(model, "Telemetry") == [{"accessLogging": {"disabled": True}}]


# ---------------------------------------------------------------- refused
@pytest.mark.parametrize("access_log, path, message", [
    ("{output: logs/access.log}", "spec.accessLog.output",
     '"logs/access.log" is neither "stdout" nor an absolute file path'),
    ("{output: /var/log/}", "spec.accessLog.output", '"/var/log/" names a directory; give the path of a file'),
    ('{output: "/var/log/a\\nb"}', "spec.accessLog.output", "contains control characters"),
    ("{output: stdout, samplingPercentage: 101}", "spec.accessLog.samplingPercentage", "101"),
    ("{output: stdout, samplingPercentage: -1}", "spec.accessLog.samplingPercentage", "-1"),
    ("{samplingPercentage: 5}", "spec.accessLog.output", "required field is missing"),
    ("{output: stdout, format: text}", "spec.accessLog.format", "unknown field"),
])
def test_bad_meshconfig_access_logs_are_refused(access_log, path, message):
    (e,) = errors(meshconfig(access_log))
    assert f"MeshConfig mesh-root/default: {path}: " in e and message in e, e


@pytest.mark.parametrize("body, path, message", [
    ("accessLogging: {samplingPercentage: 150}", "spec.accessLogging.samplingPercentage", "150"),
    ("accessLogging: {disabled: true, samplingPercentage: 5}", "spec.accessLogging.samplingPercentage",
     "has no effect with disabled: true"),
    ("selector: {matchLabels: {app: web}}\ntargetRef: {kind: Service, name: echo}\naccessLogging: {}",
     "spec.targetRef", "only one of selector, targetRef may be set"),
    ("targetRef: {kind: Deployment, name: echo}\naccessLogging: {}", "spec.targetRef.kind", "Deployment"),
    ("targetRef: {kind: HTTPRoute, name: r}\naccessLogging: {}", "spec.targetRef.kind",
     'HTTPRoute is not in group "" (the default)'),
    ("selector: {matchLabels: {}}\naccessLogging: {}", "spec.selector.matchLabels", "must not be empty"),
    ("selector: {matchLabels: {app: web}}", "spec", "at least one of accessLogging, tracing is required"),
    ("accessLogging: {disabled: yes-please}", "spec.accessLogging.disabled", "must be"),
    ("accessLogging: {}\nmetrics: [{overrides: []}]", "spec.metrics", "unknown field"),
])
def test_bad_telemetries_are_refused_with_the_field_path(body, path, message):
    got = errors(meshconfig(), svc("echo", ns="shop"), telemetry(body))
    assert len(got) == 1 and f"Telemetry shop/t: {path}: " in got[0] and message in got[0], got


def test_tracing_is_not_supported_yet_and_its_mistakes_are_still_reported():
    got = errors(meshconfig(), telemetry("tracing: {randomSamplingPercentage: 200}\naccessLogging: {}"))
    assert any("spec.tracing: " + NOT_SUPPORTED_YET in e for e in got), got
    assert any("spec.tracing.randomSamplingPercentage" in e for e in got), got


def test_a_telemetry_target_must_exist_in_its_namespace():
    other = svc("echo", ns="other")
    assert errors(meshconfig(), other, telemetry("targetRef: {kind: Service, name: echo}\naccessLogging: {}")) == [
        "p.yaml:18: Telemetry shop/t: spec.targetRef.name: Service shop/echo does not exist"]
    got = errors(meshconfig(), svc("echo", ns="shop"),
                 telemetry("targetRef: {group: gateway.networking.k8s.io, kind: GRPCRoute, name: g}\n"
                           "accessLogging: {}"))
    assert got == ["p.yaml:18: Telemetry shop/t: spec.targetRef.name: GRPCRoute shop/g does not exist"]


def test_one_telemetry_per_target_and_per_namespace_without_selector():
    target = "targetRef: {kind: Service, name: echo}\naccessLogging: {}"
    got = errors(meshconfig(), svc("echo", ns="shop"), telemetry(target), telemetry(target, name="u"))
    assert got == ["p.yaml:25: Telemetry shop/u: spec.targetRef: Service shop/echo is already the scope of "
                   "Telemetry shop/t (p.yaml:14); one Telemetry per target"]
    got = errors(meshconfig(), telemetry("accessLogging: {}"), telemetry("accessLogging: {}", name="u"))
    assert got == ["p.yaml:16: Telemetry shop/u: spec: the namespace shop is already the scope of Telemetry shop/t "
                   "(p.yaml:7); one Telemetry per namespace without a selector"]
    # several selectors may overlap: the first by namespace/name wins (documented)
    sel = "selector: {matchLabels: {app: web}}\naccessLogging: {}"
    load_ok({"p.yaml": "---\n".join([meshconfig(), telemetry(sel), telemetry(sel, name="u")])})


def test_a_telemetry_without_an_access_log_in_the_meshconfig_is_refused():
    bare = "apiVersion: hostmesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default, namespace: mesh-root}\n"
    (e,) = errors(bare, telemetry("accessLogging: {disabled: true}"))
    assert e.startswith("p.yaml:9: Telemetry shop/t: spec.accessLogging: access logs are off in this mesh: "
                        "MeshConfig mesh-root/default (p.yaml:1) has no spec.accessLog"), e
    (e,) = errors(telemetry("accessLogging: {}"))
    assert "there is no MeshConfig with spec.accessLog" in e, e
