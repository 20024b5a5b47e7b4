#!/opt/hostmesh/bin/python3
"""The agent container's entrypoint on Kubernetes: what the bootstrap file cannot know.

A DaemonSet has one ConfigMap for every node, but some bootstrap values are per node:
`node` (the downward API gives NODE_NAME), `capture.podCIDRs` (the Node's spec.podCIDRs,
which the downward API does not expose) and, for eBPF, `capture.redirectAddress` (where
pods reach this node's proxy: the node's IP, HOST_IP from the downward API, unless the
file sets one). This script writes the ConfigMap's bootstrap with those filled in to
/tmp/hostmesh-agent.yaml and execs `hostmesh agent --config` on it, so the agent itself
stays free of Kubernetes (values the file sets win, except node). Verbs:

    agent-entrypoint agent [extra agent flags]   exec the agent (PID 1 becomes the agent)
    agent-entrypoint untaint                     remove node.hostmesh.io/agent-not-ready
                                                 from this Node once /ready says ready,
                                                 then sleep (a second container)

Environment: NODE_NAME (required), HOST_IP, HOSTMESH_POD_CIDRS (comma-separated; when set the
API is not asked: CNIs that do not use Node.spec.podCIDR, e.g. Calico's IPAM blocks),
HOSTMESH_BOOTSTRAP (default /etc/hostmesh/agent.yaml), HOSTMESH_BIN (default hostmesh),
HOSTMESH_ADMIN (default http://127.0.0.1:15000), HOSTMESH_RENDERED (default
/tmp/hostmesh-agent.yaml). The API server is reached the in-cluster way
(KUBERNETES_SERVICE_HOST/PORT, the service account's token and CA). The standard library
and PyYAML (a hostmesh dependency) only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

import yaml

TAINT_KEY = "node.hostmesh.io/agent-not-ready"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
API_TIMEOUT = 10.0
UNTAINT_POLL = 2.0


class EntrypointError(Exception):
    """What went wrong, in words for `kubectl logs`."""


def pod_cidrs_from_node(node: dict) -> list[str]:
    """The IPv4 pod CIDRs of a Node object (spec.podCIDRs, else spec.podCIDR)."""
    spec = node.get("spec") or {}
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    v4 = [c for c in cidrs if ipaddress.ip_network(c, strict=False).version == 4]
    if not v4:
        name = (node.get("metadata") or {}).get("name", "?")
        raise EntrypointError(f"Node {name} has no IPv4 spec.podCIDR(s) (found {cidrs or 'none'}); "
                              f"set HOSTMESH_POD_CIDRS on the DaemonSet to this node's pod CIDRs")
    return v4


def pod_cidrs_from_env(value: str) -> list[str]:
    out = []
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        try:
            out.append(str(ipaddress.IPv4Network(item, strict=True)))
        except ValueError as exc:
            raise EntrypointError(f"HOSTMESH_POD_CIDRS: {item!r} is not an IPv4 CIDR ({exc})") from None
    if not out:
        raise EntrypointError("HOSTMESH_POD_CIDRS is set but lists no CIDR")
    return out


def needs_pod_cidrs(doc: dict) -> bool:
    capture = doc.get("capture") or {}
    return capture.get("mode", "iptables") != "none" and not capture.get("podCIDRs")


def render_bootstrap(doc: dict, env: dict, pod_cidrs: list[str] | None) -> dict:
    """The ConfigMap's bootstrap with this node's values; the file's own values win."""
    out = dict(doc)
    out["node"] = node_name(env)
    capture = dict(out.get("capture") or {})
    if pod_cidrs and not capture.get("podCIDRs"):
        capture["podCIDRs"] = list(pod_cidrs)
    if capture.get("mode") in ("ebpf", "auto") and not capture.get("redirectAddress") and env.get("HOST_IP"):
        capture["redirectAddress"] = env["HOST_IP"]
    if capture:
        out["capture"] = capture
    return out


def agent_argv(env: dict, rendered: str, extra: list[str]) -> list[str]:
    return [env.get("HOSTMESH_BIN", "hostmesh"), "agent", "--config", rendered, *extra]


def node_name(env: dict) -> str:
    name = env.get("NODE_NAME", "")
    if not name:
        raise EntrypointError("NODE_NAME is not set: give the container env NODE_NAME from the downward API "
                              "(fieldRef: spec.nodeName)")
    return name


def untaint_patch(node: dict) -> list[dict] | None:
    """A JSON patch removing our taint (guarded by a test of the list it read), or None."""
    taints = (node.get("spec") or {}).get("taints") or []
    keep = [t for t in taints if t.get("key") != TAINT_KEY]
    if len(keep) == len(taints):
        return None
    return [{"op": "test", "path": "/spec/taints", "value": taints},
            {"op": "replace", "path": "/spec/taints", "value": keep}]


# ---------------------------------------------------------------- I/O


def _api(env: dict, method: str, path: str, body: object | None = None,
         content_type: str = "application/json") -> dict:
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise EntrypointError("KUBERNETES_SERVICE_HOST is not set: not running in a pod? "
                              "(or set HOSTMESH_POD_CIDRS)")
    try:
        with open(os.path.join(SA_DIR, "token")) as f:
            token = f.read().strip()
    except OSError as exc:
        raise EntrypointError(f"cannot read the service account token: {exc.strerror} "
                              f"(automountServiceAccountToken must be on)") from None
    ctx = ssl.create_default_context(cafile=os.path.join(SA_DIR, "ca.crt"))
    if ":" in host:
        host = f"[{host}]"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"https://{host}:{port}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Accept": "application/json",
                                          "Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=API_TIMEOUT, context=ctx) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise EntrypointError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise EntrypointError(f"{method} {path}: {getattr(exc, 'reason', exc)}") from None


def pod_cidrs(env: dict) -> list[str]:
    if env.get("HOSTMESH_POD_CIDRS"):
        return pod_cidrs_from_env(env["HOSTMESH_POD_CIDRS"])
    return pod_cidrs_from_node(_api(env, "GET", f"/api/v1/nodes/{node_name(env)}"))


def load_bootstrap(path: str) -> dict:
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except OSError as exc:
        raise EntrypointError(f"{path}: cannot read the bootstrap: {exc.strerror} "
                              f"(the overlay's hostmesh-agent ConfigMap, key agent.yaml)") from None
    except yaml.YAMLError as exc:
        raise EntrypointError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise EntrypointError(f"{path}: the bootstrap must be a mapping")
    return doc


def write_private(path: str, doc: dict) -> None:
    """0600: the bootstrap names the token file, and the agent is root-only state."""
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    os.replace(path + ".tmp", path)


def run_agent(env: dict, extra: list[str]) -> None:
    doc = load_bootstrap(env.get("HOSTMESH_BOOTSTRAP", "/etc/hostmesh/agent.yaml"))
    cidrs = pod_cidrs(env) if needs_pod_cidrs(doc) else None
    rendered = env.get("HOSTMESH_RENDERED", "/tmp/hostmesh-agent.yaml")
    write_private(rendered, render_bootstrap(doc, env, cidrs))
    argv = agent_argv(env, rendered, extra)
    print(f"agent-entrypoint: exec {' '.join(argv)}", file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)


def _ready(env: dict) -> bool:
    url = env.get("HOSTMESH_ADMIN", "http://127.0.0.1:15000") + "/ready"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def run_untaint(env: dict) -> None:
    """Wait for /ready, drop the taint, then idle: the taint only gates a node's first start."""
    path = f"/api/v1/nodes/{node_name(env)}"
    while not _ready(env):
        time.sleep(UNTAINT_POLL)
    while True:
        try:
            patch = untaint_patch(_api(env, "GET", path))
            if patch is not None:
                _api(env, "PATCH", path, patch, content_type="application/json-patch+json")
                print(f"agent-entrypoint: removed the {TAINT_KEY} taint", file=sys.stderr, flush=True)
            break
        except EntrypointError as exc:   # a conflict (the test op) or the API away: read again
            print(f"agent-entrypoint: untaint: {exc}; retrying", file=sys.stderr, flush=True)
            time.sleep(UNTAINT_POLL)
    while True:
        time.sleep(3600)


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    verb, extra = (argv[0], argv[1:]) if argv else ("", [])
    try:
        if verb == "agent":
            run_agent(env, extra)
        elif verb == "untaint":
            run_untaint(env)
        else:
            print("usage: agent-entrypoint agent [agent flags] | untaint", file=sys.stderr)
            return 2
    except EntrypointError as exc:
        print(f"agent-entrypoint: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
