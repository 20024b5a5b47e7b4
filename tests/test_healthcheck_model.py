"""TrafficPolicy healthCheck in the control plane's model: accepted shapes and precise refusals."""

from __future__ import annotations

import textwrap

import pytest

from tests.test_cp_model import load_texts, svc


def errors(hc: str) -> list[str]:
    doc = svc("echo", ns="shop") + "---\n" + textwrap.dedent(f"""\
        apiVersion: hostmesh.io/v1alpha1
        kind: TrafficPolicy
        metadata: {{name: p, namespace: shop}}
        spec:
          targetRef: {{kind: Service, name: echo}}
          healthCheck: {hc}
        """)
    return [str(e).split(": ", 2)[-1] for e in load_texts({"a.yaml": doc}).errors]


@pytest.mark.parametrize("hc", [
    "{http: {path: /healthz, expectedStatuses: [200, 204]}, interval: 5s, timeout: 1s, jitter: 500ms, "
    "unhealthyThreshold: 2, healthyThreshold: 1, panicThreshold: 30, port: 80}",
    "{tcp: {}}",
    "{grpc: {service: hostmesh.testapp.v1.Echo}}",
])
def test_accepted(hc):
    assert errors(hc) == []


@pytest.mark.parametrize("hc, message", [
    ("{tcp: {}, port: 81}", "spec.healthCheck.port: Service shop/echo has no port 81 (its ports: 80)"),
    ("{tcp: {}, http: {path: /x}}", "spec.healthCheck.tcp: only one of http, tcp, grpc may be set (found http and tcp)"),
    ("{}", "spec.healthCheck: one of http, tcp, grpc is required"),
    ("{grpc: {}, timeout: 5s, interval: 1s}", 'spec.healthCheck.timeout: "5s" is longer than the interval "1s"'),
    ("{http: {path: 'x y'}}", 'spec.healthCheck.http.path: "x y" is not a request path'),
    ("{tcp: {}, unhealthyThreshold: 0}", "spec.healthCheck.unhealthyThreshold: 0 is not between 1 and 1000"),
    ("{tcp: {}, panicThreshold: 101}", "spec.healthCheck.panicThreshold: 101 is not between 0 and 100"),
    ("{tcp: {}, interval: 0s}", "spec.healthCheck.interval:"),
])
def test_refused_with_a_precise_message(hc, message):
    got = errors(hc)
    assert len(got) == 1 and got[0].startswith(message), got
