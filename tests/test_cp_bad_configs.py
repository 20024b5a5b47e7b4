"""Bad configs: each case asserts the exact messages a user sees (file:line: object: field: problem).

Every case starts from a small valid config (BASE) and adds or replaces files, so a
message that mentions BASE's objects is part of the contract too.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from controlplane.model import load_texts

SERVICES = """\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 198.19.0.10
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: http
  - name: grpc
    port: 9090
"""

WORKLOADS = """\
apiVersion: hostmesh.io/v1alpha1
kind: Workload
metadata:
  name: web-1
  labels: {app: web}
spec:
  node: node1
  address: 198.18.1.1
  ports: [{name: http, port: 8080}, {name: grpc, port: 9090}]
---
apiVersion: hostmesh.io/v1alpha1
kind: Workload
metadata:
  name: web-2
  labels: {app: web}
spec:
  node: node2
  address: 198.18.2.1
  ports: [{name: http, port: 8080}, {name: grpc, port: 9090}]
"""

BASE = {"services.yaml": SERVICES, "workloads.yaml": WORKLOADS}

ROUTE_HEAD = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: canary
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: web
"""

POLICY_HEAD = """\
apiVersion: hostmesh.io/v1alpha1
kind: {kind}
metadata:
  name: p
spec:
"""


def route(rules: str) -> str:
    return ROUTE_HEAD + "  rules:\n" + textwrap.indent(textwrap.dedent(rules), "  ")


_WEAK_RSA_JWK = json.loads(RSAAlgorithm.to_jwk(
    rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()))


def policy(kind: str, spec: str) -> str:
    return POLICY_HEAD.format(kind=kind) + textwrap.indent(textwrap.dedent(spec), "  ")


def errors(files: dict[str, str]) -> list[str]:
    result = load_texts({**BASE, **files})
    assert result.model is None
    return [str(e) for e in result.errors]


def test_base_is_valid():
    result = load_texts(BASE)
    assert result.errors == [] and result.model is not None


CASES = [
    # ---------------------------------------------------------------- wrong types
    ("wrong-type-port", {"services.yaml": SERVICES.replace("port: 80\n", 'port: "80"\n')}, [
        'services.yaml:11: Service default/web: spec.ports[0].port: must be an integer, got string "80"',
    ]),
    ("wrong-type-list", {"extra.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: api}\n"
                                       "spec:\n  ports:\n    port: 80\n"}, [
        "extra.yaml:5: Service default/api: spec.ports: must be a list, got mapping",
    ]),
    ("null-value", {"routes.yaml": route("""\
        - backendRefs:
          - name: web
            port: 80
            weight:
        """)}, [
        "routes.yaml:14: HTTPRoute default/canary: spec.rules[0].backendRefs[0].weight: must be an integer, got null",
    ]),
    ("yaml-1.1-boolean", {"routes.yaml": route("""\
        - matches:
          - headers:
            - name: x-debug
              value: yes
        """)}, [
        ("routes.yaml:14: HTTPRoute default/canary: spec.rules[0].matches[0].headers[0].value: "
         "must be a string, got boolean true"),
    ]),
    ("label-value-not-string", {"workloads.yaml": WORKLOADS.replace("labels: {app: web}", "labels: {app: web, v: 1}", 1)}, [
        "workloads.yaml:5: Workload default/web-1: metadata.labels.v: must be a string, got integer 1",
    ]),
    # ---------------------------------------------------------------- unknown fields, several depths
    ("unknown-top-level-field", {"extra.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: api}\n"
                                               "specs: {ports: [{port: 80}]}\n"}, [
        'extra.yaml:1: Service default/api: spec: required field is missing',
        'extra.yaml:4: Service default/api: specs: unknown field (did you mean "spec"?)',
    ]),
    ("unknown-metadata-field", {"workloads.yaml": WORKLOADS.replace("  name: web-2\n", "  name: web-2\n  namespce: prod\n")}, [
        'workloads.yaml:15: Workload default/web-2: metadata.namespce: unknown field (did you mean "namespace"?)',
    ]),
    ("unknown-field-in-backend-ref", {"routes.yaml": route("""\
        - backendRefs:
          - name: web
            port: 80
            weigth: 10
        """)}, [
        ('routes.yaml:14: HTTPRoute default/canary: spec.rules[0].backendRefs[0].weigth: unknown field '
         '(did you mean "weight"?)'),
    ]),
    ("unknown-field-five-levels-deep", {"routes.yaml": route("""\
        - filters:
          - type: RequestHeaderModifier
            requestHeaderModifier:
              set:
              - name: x-env
                vaule: prod
        """)}, [
        ("routes.yaml:15: HTTPRoute default/canary: spec.rules[0].filters[0].requestHeaderModifier.set[0].value: "
         "required field is missing"),
        ('routes.yaml:16: HTTPRoute default/canary: spec.rules[0].filters[0].requestHeaderModifier.set[0].vaule: '
         'unknown field (did you mean "value"?)'),
    ]),
    ("unknown-field-no-suggestion", {"services.yaml": SERVICES.replace("  - name: grpc\n", "  - name: grpc\n    nodePort: 30000\n")}, [
        ("services.yaml:14: Service default/web: spec.ports[1].nodePort: unknown field "
         "(known: name, port, targetPort, protocol, appProtocol)"),
    ]),
    # ---------------------------------------------------------------- missing fields and references
    ("missing-required-field", {"workloads.yaml": WORKLOADS.replace("  address: 198.18.2.1\n", "")}, [
        "workloads.yaml:16: Workload default/web-2: spec.address: required field is missing",
    ]),
    ("gamma-parent-needs-kind-and-group", {"routes.yaml": ROUTE_HEAD.replace('  - group: ""\n    kind: Service\n    name', "  - name")}, [
        ('routes.yaml:7: HTTPRoute default/canary: spec.parentRefs[0].group: required field is missing '
         '(hostmesh routes attach to Services (GAMMA): set group: "" and kind: Service)'),
        ('routes.yaml:7: HTTPRoute default/canary: spec.parentRefs[0].kind: required field is missing '
         '(hostmesh routes attach to Services (GAMMA): set group: "" and kind: Service)'),
    ]),
    ("missing-backend-service", {"routes.yaml": route("""\
        - backendRefs:
          - name: web
            port: 80
          - name: wbe
            port: 80
        """)}, [
        ('routes.yaml:14: HTTPRoute default/canary: spec.rules[0].backendRefs[1].name: Service default/wbe does not '
         'exist (did you mean "web"?)'),
    ]),
    ("missing-parent-in-other-namespace", {"routes.yaml": ROUTE_HEAD + "    namespace: shop\n"}, [
        "routes.yaml:9: HTTPRoute default/canary: spec.parentRefs[0].name: Service shop/web does not exist",
    ]),
    ("backend-port-not-on-service", {"routes.yaml": route("""\
        - backendRefs:
          - name: web
            port: 8080
        """)}, [
        ("routes.yaml:13: HTTPRoute default/canary: spec.rules[0].backendRefs[0].port: Service default/web has no "
         "port 8080 (ports: 80, 9090)"),
    ]),
    ("mirror-to-missing-service", {"routes.yaml": route("""\
        - filters:
          - type: RequestMirror
            requestMirror:
              backendRef: {name: shadow, port: 80}
        """)}, [
        ("routes.yaml:14: HTTPRoute default/canary: spec.rules[0].filters[0].requestMirror.backendRef.name: "
         "Service default/shadow does not exist"),
    ]),
    ("policy-target-missing", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: api}
        timeout: 5s
        """)}, [
        "policy.yaml:6: TrafficPolicy default/p: spec.targetRef.name: Service default/api does not exist",
    ]),
    ("named-target-port-nobody-defines", {"services.yaml": SERVICES.replace("targetPort: http", "targetPort: admin")}, [
        ('services.yaml:12: Service default/web: spec.ports[0].targetPort: no selected Workload defines a port named '
         '"admin" (selected: default/web-1, default/web-2)'),
    ]),
    ("named-target-port-ambiguous-on-multi-port", {"workloads.yaml": WORKLOADS.replace(
        "address: 198.18.2.1\n  ports: [{name: http, port: 8080}", "address: 198.18.2.1\n  ports: [{name: http, port: 8081}")}, [
        ('services.yaml:12: Service default/web: spec.ports[0].targetPort: "http" resolves to different ports on the '
         'selected Workloads (8080 on default/web-1, 8081 on default/web-2); a multi-port Service needs one port '
         'number per Service port'),
    ]),
    # ---------------------------------------------------------------- duplicates
    ("duplicate-object-across-files", {"more.yaml": WORKLOADS.split("---\n")[1]}, [
        "workloads.yaml:11: Workload default/web-2: defined more than once: also at more.yaml:1",
    ]),
    ("duplicate-workload-address", {"more.yaml": WORKLOADS.split("---\n")[1].replace("web-2", "web-3")}, [
        ("workloads.yaml:18: Workload default/web-2: spec.address: 198.18.2.1 is already the address of "
         "Workload default/web-3 (more.yaml:1)"),
    ]),
    ("duplicate-yaml-key", {"services.yaml": SERVICES.replace("  clusterIP: 198.19.0.10\n",
                                                              "  clusterIP: 198.19.0.10\n  clusterIP: 198.19.0.11\n")}, [
        'services.yaml:7: Service default/web: spec.clusterIP: duplicate key "clusterIP" (first at line 6)',
    ]),
    ("two-meshconfigs", {
        "a.yaml": "apiVersion: hostmesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\n",
        "b.yaml": "apiVersion: hostmesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default, namespace: mesh}\n"
                  "spec: {trustDomain: example.org}\n"}, [
        "b.yaml:1: MeshConfig mesh/default: only one MeshConfig is allowed; another is defined at a.yaml:1",
    ]),
    ("meshconfig-not-named-default", {"mesh.yaml": "apiVersion: hostmesh.io/v1alpha1\nkind: MeshConfig\n"
                                                   "metadata: {name: main}\n"}, [
        ('mesh.yaml:3: MeshConfig default/main: metadata.name: MeshConfig is a singleton and must be named "default", '
         'got "main"'),
    ]),
    # ---------------------------------------------------------------- CIDRs, addresses, ports, weights
    ("invalid-service-cidr", {"mesh.yaml": "apiVersion: hostmesh.io/v1alpha1\nkind: MeshConfig\n"
                                           "metadata: {name: default}\nspec:\n  serviceCIDR: 198.19.0.0/33\n"}, [
        'mesh.yaml:5: MeshConfig default/default: spec.serviceCIDR: "198.19.0.0/33" is not a valid IPv4 CIDR (like 10.0.0.0/8)',
    ]),
    ("cidr-with-host-bits", {"authz.yaml": policy("AuthorizationPolicy", """\
        rules:
        - from:
          - source: {ipBlocks: [10.1.2.3/8]}
        """)}, [
        ('authz.yaml:8: AuthorizationPolicy default/p: spec.rules[0].from[0].source.ipBlocks[0]: "10.1.2.3/8" has '
         'host bits set (the network is 10.0.0.0/8)'),
    ]),
    ("cluster-ip-outside-cidr", {"services.yaml": SERVICES.replace("198.19.0.10", "10.96.0.10")}, [
        ("services.yaml:6: Service default/web: spec.clusterIP: 10.96.0.10 is outside the service CIDR 198.19.0.0/16 "
         "(the default; MeshConfig spec.serviceCIDR changes it)"),
    ]),
    ("cluster-ip-used-twice", {"api.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: api}\n"
                                           "spec:\n  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n"}, [
        ("services.yaml:6: Service default/web: spec.clusterIP: 198.19.0.10 is already used by Service default/api "
         "(api.yaml:1)"),
    ]),
    ("headless-service", {"services.yaml": SERVICES.replace("198.19.0.10", "None")}, [
        ("services.yaml:6: Service default/web: spec.clusterIP: headless Services (clusterIP: None) are not "
         "supported; omit clusterIP to allocate one"),
    ]),
    ("workload-address-in-service-cidr", {"workloads.yaml": WORKLOADS.replace("198.18.2.1", "198.19.2.1")}, [
        ("workloads.yaml:18: Workload default/web-2: spec.address: 198.19.2.1 is inside the service CIDR "
         "198.19.0.0/16; workload addresses must not overlap service VIPs"),
    ]),
    ("invalid-port", {"workloads.yaml": WORKLOADS.replace("port: 9090}]\n---", "port: 70000}]\n---")}, [
        "workloads.yaml:9: Workload default/web-1: spec.ports[1].port: 70000 is not a valid port (1-65535)",
    ]),
    ("udp-port", {"services.yaml": SERVICES + "    protocol: UDP\n"}, [
        'services.yaml:15: Service default/web: spec.ports[1].protocol: "UDP" is not supported: only TCP is supported',
    ]),
    ("negative-weight", {"routes.yaml": route("""\
        - backendRefs:
          - name: web
            port: 80
            weight: 90
          - name: web
            port: 9090
            weight: -5
        """)}, [
        "routes.yaml:17: HTTPRoute default/canary: spec.rules[0].backendRefs[1].weight: -5 is not between 0 and 1000000",
    ]),
    ("max-ejection-percent", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        outlierDetection:
          maxEjectionPercent: 101
        """)}, [
        "policy.yaml:8: TrafficPolicy default/p: spec.outlierDetection.maxEjectionPercent: 101 is not between 0 and 100",
    ]),
    # ---------------------------------------------------------------- retries, outlier detection, rate limits
    ("per-try-timeout-longer-than-timeout", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        timeout: 2s
        retries: {attempts: 2, perTryTimeout: 5s}
        """)}, [
        ('policy.yaml:8: TrafficPolicy default/p: spec.retries.perTryTimeout: "5s" is longer than the request '
         'timeout "2s" (spec.timeout)'),
    ]),
    ("retry-attempts-negative", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        retries: {attempts: -1}
        """)}, [
        "policy.yaml:7: TrafficPolicy default/p: spec.retries.attempts: -1 is not between 0 and 100",
    ]),
    ("retry-on-unknown-condition", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        retries:
          attempts: 2
          retryOn: [reset, 5xxx]
        """)}, [
        ('policy.yaml:9: TrafficPolicy default/p: spec.retries.retryOn[1]: "5xxx" is not one of 5xx, gateway-error, '
         "reset, connect-failure, retriable-4xx, refused-stream, retriable-status-codes, cancelled, "
         'deadline-exceeded, internal, resource-exhausted, unavailable (did you mean "5xx"?)'),
    ]),
    ("retriable-status-codes-missing", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        retries:
          attempts: 2
          retryOn: [retriable-status-codes]
        """)}, [
        ("policy.yaml:7: TrafficPolicy default/p: spec.retries.retriableStatusCodes: required when retryOn contains "
         "retriable-status-codes"),
    ]),
    ("retriable-status-codes-without-retry-on", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        retries:
          attempts: 2
          retryOn: [5xx]
          retriableStatusCodes: [503, 600]
        """)}, [
        "policy.yaml:10: TrafficPolicy default/p: spec.retries.retriableStatusCodes[1]: 600 is not between 100 and 599",
        ("policy.yaml:10: TrafficPolicy default/p: spec.retries.retriableStatusCodes: only used with retryOn "
         "retriable-status-codes"),
    ]),
    ("retry-backoff-max-below-base", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        retries:
          attempts: 2
          backoff: {baseInterval: 1s, maxInterval: 100ms}
        """)}, [
        ('policy.yaml:9: TrafficPolicy default/p: spec.retries.backoff.maxInterval: "100ms" is shorter than '
         'baseInterval "1s"'),
    ]),
    ("retry-budget-percent", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        retries: {attempts: 2, budget: {percent: 120}}
        """)}, [
        "policy.yaml:7: TrafficPolicy default/p: spec.retries.budget.percent: 120 is not between 0 and 100",
    ]),
    ("outlier-no-trigger", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        outlierDetection: {consecutive5xxErrors: 0, consecutiveGatewayErrors: 0, interval: 0s}
        """)}, [
        ('policy.yaml:7: TrafficPolicy default/p: spec.outlierDetection.interval: "0s" must be longer than 0s'),
        ("policy.yaml:7: TrafficPolicy default/p: spec.outlierDetection: sets no ejection trigger: "
         "consecutive5xxErrors and consecutiveGatewayErrors are both 0"),
    ]),
    ("rate-limit-zero-requests", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        rateLimit: {requestsPerUnit: 0, unit: second}
        """)}, [
        "policy.yaml:7: TrafficPolicy default/p: spec.rateLimit.requestsPerUnit: 0 is not between 1 and 2147483647",
    ]),
    ("rate-limit-zero-burst-and-unit", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        rateLimit: {requestsPerUnit: 10, unit: day, burst: 0}
        """)}, [
        'policy.yaml:7: TrafficPolicy default/p: spec.rateLimit.unit: "day" is not one of second, minute, hour',
        "policy.yaml:7: TrafficPolicy default/p: spec.rateLimit.burst: 0 is not between 1 and 2147483647",
    ]),
    ("connection-pool-zero-max-requests", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        connectionPool: {maxRequests: 0, maxRetries: 0}
        """)}, [
        "policy.yaml:7: TrafficPolicy default/p: spec.connectionPool.maxRequests: 0 is not between 1 and 2147483647",
        "policy.yaml:7: TrafficPolicy default/p: spec.connectionPool.maxRetries: 0 is not between 1 and 2147483647",
    ]),
    # ---------------------------------------------------------------- FaultInjection
    ("fault-abort-percentage", {"fault.yaml": policy("FaultInjection", """\
        targetRef: {kind: Service, name: web}
        abort: {percentage: 150, httpStatus: 503}
        """)}, [
        "fault.yaml:7: FaultInjection default/p: spec.abort.percentage: 150 is not between 0 and 100",
    ]),
    ("fault-delay-percentage", {"fault.yaml": policy("FaultInjection", """\
        targetRef: {kind: Service, name: web}
        delay: {percentage: -1, fixedDelay: 1s}
        """)}, [
        "fault.yaml:7: FaultInjection default/p: spec.delay.percentage: -1 is not between 0 and 100",
    ]),
    ("fault-target-deployment", {"fault.yaml": policy("FaultInjection", """\
        targetRef: {kind: Deployment, name: web}
        abort: {percentage: 5, httpStatus: 503}
        """)}, [
        'fault.yaml:6: FaultInjection default/p: spec.targetRef.kind: "Deployment" is not one of Service, HTTPRoute, '
        "GRPCRoute",
    ]),
    ("fault-target-route-without-group", {"fault.yaml": policy("FaultInjection", """\
        targetRef: {kind: HTTPRoute, name: canary}
        abort: {percentage: 5, httpStatus: 503}
        """)}, [
        ('fault.yaml:6: FaultInjection default/p: spec.targetRef.kind: HTTPRoute is not in group "" (the default): '
         'an HTTPRoute is in group "gateway.networking.k8s.io"'),
    ]),
    ("fault-target-route-missing", {"fault.yaml": policy("FaultInjection", """\
        targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: canari}
        abort: {percentage: 5, httpStatus: 503}
        """), "routes.yaml": route("- backendRefs: [{name: web, port: 80}]\n")}, [
        ('fault.yaml:6: FaultInjection default/p: spec.targetRef.name: HTTPRoute default/canari does not exist '
         '(did you mean "canary"?)'),
    ]),
    ("fault-target-service-missing", {"fault.yaml": policy("FaultInjection", """\
        targetRef: {kind: Service, name: api}
        delay: {percentage: 5, fixedDelay: 1s}
        """)}, [
        "fault.yaml:6: FaultInjection default/p: spec.targetRef.name: Service default/api does not exist",
    ]),
    ("fault-headers-duplicate-name", {"fault.yaml": policy("FaultInjection", """\
        targetRef: {kind: Service, name: web}
        abort: {percentage: 5, httpStatus: 503}
        headers:
        - {name: X-Fault, value: abort}
        - {name: x-fault, value: delay}
        """)}, [
        ('fault.yaml:10: FaultInjection default/p: spec.headers[1].name: duplicate header "x-fault" '
         "(also at spec.headers[0])"),
    ]),
    # ---------------------------------------------------------------- durations
    ("invalid-duration", {"routes.yaml": route("""\
        - timeouts:
            request: 10 s
        """)}, [
        ('routes.yaml:12: HTTPRoute default/canary: spec.rules[0].timeouts.request: "10 s" is not a duration '
         '(Gateway API format: up to 4 parts of <number><h|m|s|ms>, e.g. 10s, 500ms, 1h30m)'),
    ]),
    ("duration-as-number", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        timeout: 30
        """)}, [
        ("policy.yaml:7: TrafficPolicy default/p: spec.timeout: must be a duration string (e.g. 10s, 500ms, 1h30m), "
         "got integer 30"),
    ]),
    ("backend-timeout-longer-than-request", {"routes.yaml": route("""\
        - timeouts: {request: 1s, backendRequest: 2s}
        """)}, [
        ('routes.yaml:11: HTTPRoute default/canary: spec.rules[0].timeouts.backendRequest: "2s" is longer than the '
         'request timeout "1s"'),
    ]),
    ("certificate-ttl-too-short", {"mesh.yaml": "apiVersion: hostmesh.io/v1alpha1\nkind: MeshConfig\n"
                                                "metadata: {name: default}\nspec: {certificateTTL: 30s}\n"}, [
        'mesh.yaml:4: MeshConfig default/default: spec.certificateTTL: "30s" is shorter than the minimum 1m',
    ]),
    # ---------------------------------------------------------------- regexes
    ("invalid-path-regex", {"routes.yaml": route("""\
        - matches:
          - path: {type: RegularExpression, value: "/api/(v1|v2"}
        """)}, [
        ('routes.yaml:12: HTTPRoute default/canary: spec.rules[0].matches[0].path.value: "/api/(v1|v2" is not a valid '
         'regular expression: missing ), unterminated subpattern at position 5'),
    ]),
    ("invalid-header-regex", {"routes.yaml": route("""\
        - matches:
          - headers:
            - {type: RegularExpression, name: x-user, value: "*admin"}
        """)}, [
        ('routes.yaml:13: HTTPRoute default/canary: spec.rules[0].matches[0].headers[0].value: "*admin" is not a valid '
         'regular expression: nothing to repeat at position 0'),
    ]),
    ("invalid-grpc-method-regex", {"grpc.yaml": ROUTE_HEAD.replace("HTTPRoute", "GRPCRoute") + (
        "  rules:\n"
        "  - matches:\n"
        '    - method: {type: RegularExpression, service: "echo[.Echo"}\n')}, [
        ('grpc.yaml:12: GRPCRoute default/canary: spec.rules[0].matches[0].method.service: "echo[.Echo" is not a '
         'valid regular expression: unterminated character set at position 4'),
    ]),
    # ---------------------------------------------------------------- YAML syntax
    ("yaml-mapping-value-not-allowed", {"broken.yaml": "apiVersion: v1\nkind: Service\nmetadata:\n  name: a: b\n"}, [
        "broken.yaml:4:10: YAML syntax error: mapping values are not allowed here",
    ]),
    ("yaml-unclosed-flow-sequence", {"broken.yaml": "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n"
                                                    "spec:\n  ports: [{port: 80}\n"}, [
        ("broken.yaml:6:1: YAML syntax error: expected ',' or ']', but got '<stream end>' "
         "(while parsing a flow sequence at line 5, column 10)"),
    ]),
    ("yaml-tab-indent", {"broken.yaml": "apiVersion: v1\nkind: Service\nmetadata:\n\tname: a\n"}, [
        ("broken.yaml:4:1: YAML syntax error: found character '\\t' that cannot start any token "
         "(while scanning for the next token)"),
    ]),
    ("yaml-error-in-second-document-keeps-checking-the-others", {"broken.yaml": (
        "apiVersion: v1\nkind: Service\nmetadata: {name: Api}\nspec: {ports: [{port: 80}]}\n"
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: 'b}\n")}, [
        ('broken.yaml:3: Service default/Api: metadata.name: "Api" is not a valid DNS-1035 label (lowercase letters, '
         "digits and '-', starting with a letter and ending with a letter or digit, at most 63 characters)"),
        ("broken.yaml:9:1: YAML syntax error: found unexpected end of stream (while scanning a quoted scalar at "
         "line 8, column 18)"),
    ]),
    ("document-not-a-mapping", {"list.yaml": "- apiVersion: v1\n  kind: Service\n"}, [
        ("list.yaml:1: document 1: a config document must be a mapping with apiVersion, kind, metadata and spec, "
         "got list"),
    ]),
    # ---------------------------------------------------------------- kinds and names
    ("unknown-kind", {"x.yaml": "apiVersion: v1\nkind: Servce\nmetadata: {name: x}\n"}, [
        ('x.yaml:2: document 1: kind: unknown kind "Servce" (did you mean "Service"?); known kinds: v1 Service, '
         "hostmesh.io/v1alpha1 Workload, gateway.networking.k8s.io/v1 HTTPRoute, gateway.networking.k8s.io/v1 "
         "GRPCRoute, hostmesh.io/v1alpha1 TrafficPolicy, hostmesh.io/v1alpha1 FaultInjection, hostmesh.io/v1alpha1 "
         "AuthorizationPolicy, hostmesh.io/v1alpha1 PeerAuthentication, hostmesh.io/v1alpha1 RequestAuthentication, "
         "hostmesh.io/v1alpha1 MeshConfig, hostmesh.io/v1alpha1 Telemetry"),
    ]),
    ("unknown-api-version-and-kind", {"x.yaml": "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
                                                "metadata: {name: x}\n"}, [
        ('x.yaml:1: document 1: apiVersion: unknown apiVersion "networking.istio.io/v1" (known: v1, '
         "hostmesh.io/v1alpha1, gateway.networking.k8s.io/v1)"),
        ('x.yaml:2: document 1: kind: unknown kind "VirtualService"; known kinds: v1 Service, hostmesh.io/v1alpha1 '
         "Workload, gateway.networking.k8s.io/v1 HTTPRoute, gateway.networking.k8s.io/v1 GRPCRoute, "
         "hostmesh.io/v1alpha1 TrafficPolicy, hostmesh.io/v1alpha1 FaultInjection, hostmesh.io/v1alpha1 "
         "AuthorizationPolicy, hostmesh.io/v1alpha1 PeerAuthentication, hostmesh.io/v1alpha1 RequestAuthentication, "
         "hostmesh.io/v1alpha1 MeshConfig, hostmesh.io/v1alpha1 Telemetry"),
    ]),
    ("wrong-api-version-for-kind", {"routes.yaml": ROUTE_HEAD.replace("k8s.io/v1", "k8s.io/v1beta1")}, [
        ('routes.yaml:1: HTTPRoute default/canary: apiVersion: HTTPRoute is served as gateway.networking.k8s.io/v1, '
         'not "gateway.networking.k8s.io/v1beta1"'),
    ]),
    ("bad-service-name", {"services.yaml": SERVICES.replace("name: web\n", "name: Web_1\n", 1)}, [
        ('services.yaml:4: Service default/Web_1: metadata.name: "Web_1" is not a valid DNS-1035 label (lowercase '
         "letters, digits and '-', starting with a letter and ending with a letter or digit, at most 63 characters)"),
    ]),
    ("bad-workload-name-and-namespace", {"workloads.yaml": WORKLOADS.replace(
        "  name: web-2\n", "  name: web-2.\n  namespace: Prod\n")}, [
        ('workloads.yaml:14: Workload Prod/web-2.: metadata.name: "web-2." is not a valid DNS-1123 subdomain '
         "(lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters)"),
        ('workloads.yaml:15: Workload Prod/web-2.: metadata.namespace: "Prod" is not a valid DNS-1123 label '
         "(lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)"),
    ]),
    # ---------------------------------------------------------------- one-of rules and filters
    ("jwks-uri-and-jwks-both-set", {"jwt.yaml": policy("RequestAuthentication", """\
        jwtRules:
        - issuer: https://issuer.example.com
          jwksUri: https://issuer.example.com/keys
          jwks: '{"keys": []}'
        """)}, [
        ("jwt.yaml:9: RequestAuthentication default/p: spec.jwtRules[0].jwks: only one of jwksUri, jwks may be set "
         "(found jwksUri and jwks)"),
    ]),
    ("jwks-uri-not-https", {"jwt.yaml": policy("RequestAuthentication", """\
        jwtRules:
        - issuer: me
          jwksUri: http://issuer.example.com/keys
        """)}, [
        ('jwt.yaml:8: RequestAuthentication default/p: spec.jwtRules[0].jwksUri: "http://issuer.example.com/keys" '
         "is not an https:// URL"),
    ]),
    ("ring-hash-needs-exactly-one-key", {"policy.yaml": policy("TrafficPolicy", """\
        targetRef: {kind: Service, name: web}
        loadBalancer:
          type: RING_HASH
          ringHash: {}
        """)}, [
        "policy.yaml:9: TrafficPolicy default/p: spec.loadBalancer.ringHash: one of header, cookie, sourceIP is required",
    ]),
    ("fault-abort-both-statuses", {"fault.yaml": policy("FaultInjection", """\
        targetRef: {kind: Service, name: web}
        abort: {percentage: 5, httpStatus: 503, grpcStatus: 14}
        """)}, [
        ("fault.yaml:7: FaultInjection default/p: spec.abort.grpcStatus: only one of httpStatus, grpcStatus may be set "
         "(found httpStatus and grpcStatus)"),
    ]),
    ("filter-config-does-not-match-type", {"routes.yaml": route("""\
        - filters:
          - type: RequestHeaderModifier
            urlRewrite: {hostname: example.com}
        """)}, [
        ("routes.yaml:12: HTTPRoute default/canary: spec.rules[0].filters[0].requestHeaderModifier: required when type "
         "is RequestHeaderModifier"),
        ("routes.yaml:13: HTTPRoute default/canary: spec.rules[0].filters[0].urlRewrite: must not be set when type is "
         "RequestHeaderModifier"),
    ]),
    ("redirect-with-backends", {"routes.yaml": route("""\
        - filters:
          - type: RequestRedirect
            requestRedirect: {scheme: https}
          backendRefs:
          - {name: web, port: 80}
        """)}, [
        ("routes.yaml:11: HTTPRoute default/canary: spec.rules[0].filters: a RequestRedirect filter must not be used "
         "together with backendRefs"),
    ]),
    ("enum-case", {"authz.yaml": policy("AuthorizationPolicy", "action: deny\n")}, [
        ('authz.yaml:6: AuthorizationPolicy default/p: spec.action: "deny" is not one of ALLOW, DENY, AUDIT '
         '(did you mean "DENY"?)'),
    ]),
    ("authz-custom-action", {"authz.yaml": policy("AuthorizationPolicy", "action: CUSTOM\n")}, [
        ('authz.yaml:6: AuthorizationPolicy default/p: spec.action: "CUSTOM" is not supported: hostmesh has no '
         'external authorizers'),
    ]),
    ("authz-bad-conditions", {"authz.yaml": policy("AuthorizationPolicy", """\
        rules:
        - when:
          - {key: source.ip, values: ["10.0.0.300"]}
          - {key: destination.port, values: ["http"]}
          - {key: request.time, values: ["x"]}
          - {key: source.principal}
        """)}, [
        'authz.yaml:8: AuthorizationPolicy default/p: spec.rules[0].when[0].values[0]: "10.0.0.300" is not an '
        'IPv4 address or CIDR',
        'authz.yaml:9: AuthorizationPolicy default/p: spec.rules[0].when[1].values[0]: "http" is not a port number',
        'authz.yaml:10: AuthorizationPolicy default/p: spec.rules[0].when[2].key: "request.time" is not a condition '
        'key (known: source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, '
        'request.auth.principal, request.auth.audiences, request.auth.presenter, request.headers[NAME], '
        'request.auth.claims[NAME])',
        'authz.yaml:11: AuthorizationPolicy default/p: spec.rules[0].when[3]: at least one of values, notValues '
        'is required',
    ]),
    ("authz-empty-and-wildcard-principals", {"authz.yaml": policy("AuthorizationPolicy", """\
        rules:
        - from: [{source: {principals: ["", "cluster.local/*/sa/web"]}}]
        """)}, [
        'authz.yaml:7: AuthorizationPolicy default/p: spec.rules[0].from[0].source.principals[0]: must not be empty',
        'authz.yaml:7: AuthorizationPolicy default/p: spec.rules[0].from[0].source.principals[1]: '
        '"cluster.local/*/sa/web": \'*\' may only be the whole value, a prefix (x*) or a suffix (*x)',
    ]),
    # ---------------------------------------------------------------- request attributes and JWT
    ("authz-bad-request-keys", {"x.yaml": policy("AuthorizationPolicy", """\
        rules:
        - when:
          - {key: request.foo, values: [a]}
          - {key: "request.headers[]", values: [a]}
          - {key: "request.auth.claims[a][]", values: [a]}
        """)}, [
        'x.yaml:8: AuthorizationPolicy default/p: spec.rules[0].when[0].key: "request.foo" is not a condition key '
        '(known: source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, '
        'request.auth.principal, request.auth.audiences, request.auth.presenter, request.headers[NAME], '
        'request.auth.claims[NAME])',
        'x.yaml:9: AuthorizationPolicy default/p: spec.rules[0].when[1].key: "request.headers[]": '
        'request.headers[NAME] needs one valid HTTP header name',
        'x.yaml:10: AuthorizationPolicy default/p: spec.rules[0].when[2].key: "request.auth.claims[a][]": '
        'request.auth.claims[NAME] (nested: [a][b]) needs non-empty claim names',
    ]),
    ("authz-bad-operation", {"x.yaml": policy("AuthorizationPolicy", """\
        rules:
        - to: [{operation: {methods: ["GE T"], paths: [admin], hosts: ["a*b"]}}]
        """)}, [
        'x.yaml:7: AuthorizationPolicy default/p: spec.rules[0].to[0].operation.methods[0]: "GE T" is not an HTTP '
        'method (like GET)',
        'x.yaml:7: AuthorizationPolicy default/p: spec.rules[0].to[0].operation.paths[0]: "admin" is not a path: '
        "it must start with '/' or use a '*' prefix/suffix wildcard",
        'x.yaml:7: AuthorizationPolicy default/p: spec.rules[0].to[0].operation.hosts[0]: "a*b": \'*\' may only be '
        'the whole value, a prefix (x*) or a suffix (*x)',
    ]),
    ("jwks-unparsable-symmetric-and-weak", {"jwt.yaml": policy("RequestAuthentication", """\
        jwtRules:
        - issuer: https://a.example.com
          jwks: 'not json'
        - issuer: https://b.example.com
          jwks: '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'
        - issuer: https://c.example.com
          jwks: '%s'
        """ % json.dumps({"keys": [_WEAK_RSA_JWK]}))}, [
        "jwt.yaml:8: RequestAuthentication default/p: spec.jwtRules[0].jwks: is not valid JSON: Expecting value: "
        "line 1 column 1 (char 0)",
        'jwt.yaml:10: RequestAuthentication default/p: spec.jwtRules[1].jwks.keys[0]: symmetric keys (kty "oct") '
        "are refused: a JWKS must hold public keys",
        "jwt.yaml:12: RequestAuthentication default/p: spec.jwtRules[2].jwks.keys[0]: RSA key of 1024 bits is too "
        "weak (at least 2048)",
    ]),
    ("jwt-bad-params-and-outputs", {"jwt.yaml": policy("RequestAuthentication", """\
        jwtRules:
        - issuer: https://a.example.com
          jwksUri: https://a.example.com/keys
          fromParams: ["a=b"]
          outputClaimToHeaders: [{header: x-sub}]
        - issuer: https://b.example.com
          jwksUri: https://b.example.com/keys
          outputPayloadToHeader: host
        """)}, [
        'jwt.yaml:9: RequestAuthentication default/p: spec.jwtRules[0].fromParams[0]: "a=b" is not a query '
        "parameter name",
        "jwt.yaml:10: RequestAuthentication default/p: spec.jwtRules[0].outputClaimToHeaders[0].claim: required "
        "field is missing",
        "jwt.yaml:13: RequestAuthentication default/p: spec.jwtRules[1].outputPayloadToHeader: 'host' is a header "
        "the proxy must not write",
    ]),
    ("meshconfig-bad-escaped-slashes", {"mesh.yaml": "apiVersion: hostmesh.io/v1alpha1\nkind: MeshConfig\n"
                                                     "metadata: {name: default}\nspec:\n"
                                                     "  pathNormalization: {escapedSlashes: BOGUS}\n"}, [
        'mesh.yaml:5: MeshConfig default/default: spec.pathNormalization.escapedSlashes: "BOGUS" is not one of '
        "REJECT, KEEP_UNCHANGED, UNESCAPE_AND_FORWARD",
    ]),
]


@pytest.mark.parametrize("files,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config(files, expected):
    assert errors(files) == expected


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


def test_one_load_reports_all_errors_across_files():
    files = {
        "routes.yaml": route("""\
            - backendRefs:
              - {name: web, port: 80, weight: -1}
            """),
        "policy.yaml": policy("TrafficPolicy", "targetRef: {kind: Service, name: nope}\ntimeout: 5s\n"),
        "mesh.yaml": "apiVersion: hostmesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\n"
                     "spec: {trustDomain: Cluster.Local, serviceCIDR: 198.19.0.0/16}\n",
        "broken.yaml": "a: [\n",
        "dup.yaml": SERVICES,
    }
    result = load_texts({**BASE, **files})
    assert result.model is None
    text = [str(e) for e in result.errors]
    assert text == [
        ("broken.yaml:2:1: YAML syntax error: expected the node content, but found '<stream end>' "
         "(while parsing a flow node at line 2, column 1)"),
        ('mesh.yaml:4: MeshConfig default/default: spec.trustDomain: "Cluster.Local" is not a valid trust domain '
         "(lowercase DNS name like cluster.local)"),
        "policy.yaml:6: TrafficPolicy default/p: spec.targetRef.name: Service default/nope does not exist",
        "routes.yaml:12: HTTPRoute default/canary: spec.rules[0].backendRefs[0].weight: -1 is not between 0 and 1000000",
        "services.yaml:1: Service default/web: defined more than once: also at dup.yaml:1",
    ]
    # every issue is structured too (for /debug and `hostmesh status -o json`)
    first = result.errors[1].to_dict()
    assert first["file"] == "mesh.yaml" and first["line"] == 4 and first["object"] == "MeshConfig default/default"
    assert first["path"] == "spec.trustDomain" and first["severity"] == "error"


def test_invalid_object_does_not_cause_missing_reference_noise():
    """A route pointing at a Service that is itself invalid reports only the Service's error."""
    files = {
        "services.yaml": SERVICES.replace("  selector:", "  selectr:"),
        "routes.yaml": route("- backendRefs: [{name: web, port: 80}]\n"),
    }
    assert errors(files) == [
        'services.yaml:7: Service default/web: spec.selectr: unknown field (did you mean "selector"?)',
    ]


def test_merge_keys_and_unknown_tags_are_rejected():
    text = ("apiVersion: v1\nkind: Service\nmetadata: {name: api}\n"
            "spec:\n  <<: {clusterIP: 198.19.0.20}\n  ports: [{port: !port 80}]\n")
    assert errors({"api.yaml": text}) == [
        "api.yaml:5: Service default/api: spec: YAML merge keys (<<) are not supported",
        "api.yaml:6: Service default/api: spec.ports[0].port: unsupported YAML tag !port",
        'api.yaml:6: Service default/api: spec.ports[0].port: must be an integer, got string "80"',
    ]


def test_alias_bomb_is_bounded():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 7):
        bomb += f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join(f"*{chr(96 + i)}" for _ in range(10)) + "]\n"
    result = load_texts({"bomb.yaml": bomb})
    assert [str(e) for e in result.errors] == [
        "bomb.yaml:1: document 1: document has more than 100000 values (after expanding aliases)"]
