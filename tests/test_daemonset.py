"""daemonset/: every object of the base and both overlays validates offline against a pinned
Kubernetes version, the agent's pod grants what `hostmesh check` looks for (the same
capabilities as hostmesh-agent.service) and mounts what the agent touches, the bootstraps
load with the agent's own loader, and the control plane's command line parses."""

from __future__ import annotations

import inspect
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from hostmesh.cli import build_parser
from meshlab.supervisor import parse_unit
from nodeagent import bootstrap, preflight
from nodeagent.capture.ebpf_loader import PIN_ROOT
from nodeagent.handoff import SOCKET_NAME
from nodeagent.instance_lock import LOCK_NAME
from tests.kustomize import render
from tests.test_agent_entrypoint import entrypoint

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = ("iptables", "ebpf")
K8S_VERSION = "1.30.0"   # the oldest Kubernetes the manifests are validated against
AGENT_UNIT = REPO / "hostmesh" / "systemd" / "hostmesh-agent.service"

# monitoring.coreos.com/v1, transcribed from the Prometheus Operator's CRDs for the fields
# monitoring.yaml uses (kubernetes-validate has no schemas for custom kinds)
_LABEL_SELECTOR = {"type": "object", "additionalProperties": False,
                   "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}}
_NS_SELECTOR = {"type": "object", "additionalProperties": False,
                "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}}
_ENDPOINT = {"type": "object", "additionalProperties": False, "required": ["port"],
             "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?)$"}}}


def _monitor_schema(endpoints: str) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", endpoints],
                 "properties": {"selector": _LABEL_SELECTOR, "namespaceSelector": _NS_SELECTOR,
                                endpoints: {"type": "array", "minItems": 1, "items": _ENDPOINT}}}}}


CUSTOM_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): _monitor_schema("endpoints"),
                  ("monitoring.coreos.com/v1", "PodMonitor"): _monitor_schema("podMetricsEndpoints")}


def rendered(overlay: str) -> list[dict]:
    return render(REPO / "daemonset" / "overlays" / overlay)


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def agent_pod(objects: list[dict]) -> dict:
    return one(objects, "DaemonSet", "hostmesh-agent")["spec"]["template"]["spec"]


def container(pod: dict, name: str) -> dict:
    return next(c for c in pod["containers"] if c["name"] == name)


def volume_of(pod: dict, cont: dict, path: str) -> tuple[dict, dict]:
    """(volume, mount) of the deepest mount that holds `path` in the container."""
    mounts = [m for m in cont["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is on no volume of {cont['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    return next(v for v in pod["volumes"] if v["name"] == mount["name"]), mount


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_kubernetes(overlay):
    objects = rendered(overlay)
    validated = set()
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if key in CUSTOM_SCHEMAS:
            jsonschema.Draft7Validator(CUSTOM_SCHEMAS[key]).validate(obj)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        validated.add(obj["kind"])
    assert {"DaemonSet", "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "PodMonitor",
            "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ServiceAccount", "ConfigMap",
            "Namespace"} <= validated


def test_the_validator_is_strict_enough_to_catch_a_typo():
    pod = rendered("iptables")
    ds = one(pod, "DaemonSet", "hostmesh-agent")
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


def test_the_overlays_differ_only_where_they_mean_to():
    ipt, ebpf = rendered("iptables"), rendered("ebpf")
    assert [(o["kind"], o["metadata"]["name"]) for o in ipt] == [(o["kind"], o["metadata"]["name"]) for o in ebpf]
    changed = [o["kind"] for o, p in zip(ipt, ebpf) if o != p]
    assert changed == ["DaemonSet", "ConfigMap"]


def _agent_boot(objects: list[dict]) -> bootstrap.Bootstrap:
    """The bootstrap as the entrypoint renders it for a node, loaded by the agent's loader."""
    text = one(objects, "ConfigMap", "hostmesh-agent")["data"]["agent.yaml"]
    doc = entrypoint().render_bootstrap(yaml.safe_load(text), {"NODE_NAME": "node-1", "HOST_IP": "10.0.0.7"},
                                        ["10.244.1.0/24"])
    return bootstrap.build(doc_to_flat(doc), {})


def doc_to_flat(doc: dict) -> dict:
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(doc, f)
        f.flush()
        return bootstrap.load_file(f.name)


@pytest.mark.parametrize("overlay,mode", [("iptables", "iptables"), ("ebpf", "ebpf")])
def test_the_overlay_bootstrap_loads_and_lives_on_the_pods_volumes(overlay, mode):
    objects = rendered(overlay)
    boot = _agent_boot(objects)
    assert boot.node == "node-1" and boot.capture_mode == mode and boot.pod_cidrs == ("10.244.1.0/24",)
    assert boot.control_plane == ("hostmesh-controlplane.hostmesh-system.svc:15010",)
    if mode == "ebpf":
        assert boot.redirect_address == "10.0.0.7" and boot.capture_cgroups
    pod = agent_pod(objects)
    agent = container(pod, "agent")
    # state dir: a hostPath, so the old and the new pod of a rolling update share the lock
    # and the hand-off socket, and the persisted snapshot survives the pod
    for path in (boot.state_dir, f"{boot.state_dir}/{SOCKET_NAME}", f"{boot.state_dir}/{LOCK_NAME}"):
        vol, mount = volume_of(pod, agent, path)
        assert vol["hostPath"]["path"] == mount["mountPath"] == boot.state_dir and not mount.get("readOnly")
    vol, _ = volume_of(pod, agent, boot.cert_dir)   # workload keys: memory only
    assert vol["emptyDir"]["medium"] == "Memory"
    vol, _ = volume_of(pod, agent, boot.cp_token_file)
    sources = vol["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["path"] == Path(boot.cp_token_file).name
    assert vol["projected"]["defaultMode"] & 0o077 == 0   # the agent refuses a group/other-readable token
    vol, _ = volume_of(pod, agent, boot.cp_root_bundle)
    assert vol["configMap"]["name"] == "hostmesh-root-bundle"
    vol, _ = volume_of(pod, agent, "/etc/hostmesh/agent.yaml")   # the entrypoint's default
    assert vol["configMap"]["name"] == "hostmesh-agent"
    # the probes ask the health endpoint the bootstrap names, on a port the pod declares
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert boot.health_host == "0.0.0.0" and ports["http-monitoring"] == boot.health_port
    from nodeagent.admin import HEALTH_PATHS
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        assert agent[probe]["httpGet"] == {"path": path, "port": "http-monitoring"} and path in HEALTH_PATHS
    # drainGrace fits the grace period the kubelet gives before SIGKILL
    assert pod["terminationGracePeriodSeconds"] > boot.drain_grace + 5


def _unit_capabilities() -> set[str]:
    svc = parse_unit(AGENT_UNIT.read_text())["Service"]
    return {c.removeprefix("CAP_") for c in " ".join(svc["CapabilityBoundingSet"]).split()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_agent_gets_the_units_capabilities_and_every_one_hostmesh_check_looks_for(overlay):
    pod = agent_pod(rendered(overlay))
    sc = container(pod, "agent")["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    added = set(sc["capabilities"]["add"])
    assert added == _unit_capabilities()
    wanted = {c.removeprefix("CAP_") for c in preflight.cap_names((1 << 64) - 1)}
    assert wanted <= added, wanted - added
    assert sc.get("privileged") is False
    assert not pod.get("hostPID") and not pod.get("hostIPC") and pod["hostNetwork"] is True
    for c in pod["containers"] + pod.get("initContainers", []):
        assert not c.get("securityContext", {}).get("privileged"), c["name"]
        if c["name"] != "agent":
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, c["name"]


def _default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_agent_mounts_what_hostmesh_check_and_the_agent_touch(overlay):
    pod = agent_pod(rendered(overlay))
    agent = container(pod, "agent")
    host_paths = {
        PIN_ROOT: "/sys/fs/bpf",                               # eBPF pins outlive the pod
        "/sys/fs/cgroup": "/sys/fs/cgroup",                    # cgroup2 (preflight's cgroup2 item)
        preflight.NETNS_DIR: preflight.NETNS_DIR,              # `hostmesh check` netns probes
        _default(preflight.diagnose_kernel_headers, "modules_root"): "/lib/modules",   # bcc's headers
        _default(preflight.diagnose_kernel_headers, "src_root"): "/usr/src",
        "/run/xtables.lock": "/run/xtables.lock",              # shared with kube-proxy
    }
    for path, host in host_paths.items():
        vol, mount = volume_of(pod, agent, path)
        assert vol["hostPath"]["path"] == host == mount["mountPath"], path
    assert volume_of(pod, agent, "/run/xtables.lock")[0]["hostPath"]["type"] == "FileOrCreate"
    # pins: the host's bpffs, and mounts the host makes there show up in the pod
    assert volume_of(pod, agent, PIN_ROOT)[1]["mountPropagation"] == "HostToContainer"
    # read-only where the agent only reads (attaching cgroup programs needs a directory fd)
    for path in ("/sys/fs/cgroup", "/lib/modules", "/usr/src"):
        assert volume_of(pod, agent, path)[1]["readOnly"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_daemonset_hands_listeners_over_during_a_rolling_update(overlay):
    ds = one(rendered(overlay), "DaemonSet", "hostmesh-agent")
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = ds["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    for c in pod["containers"]:
        env = {e["name"]: e for e in c["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_the_ebpf_overlay_is_guaranteed_qos_and_checks_bpffs_first():
    pod = agent_pod(rendered("ebpf"))
    for c in pod["containers"]:
        assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]
    init = pod["initContainers"][0]
    assert init["name"] == "check-bpffs" and "bpf_fs" in init["command"][-1]
    assert volume_of(pod, init, "/sys/fs/bpf")[0]["name"] == "bpffs"


def test_the_controlplane_command_line_parses_and_its_ports_are_served():
    objects = rendered("iptables")
    dep = one(objects, "Deployment", "hostmesh-controlplane")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    cp = container(pod, "controlplane")
    args = build_parser().parse_args(cp["args"])
    assert args.command == "controlplane" and not args.insecure
    assert args.source == "kubernetes" and args.config_dir is None and args.kubeconfig is None   # in-cluster
    assert args.token_review and args.token_audience == "hostmesh"
    # the agents' tokens: projected for that audience, from the service account the review accepts
    agent_pod_spec = agent_pod(objects)
    projected = [s["serviceAccountToken"] for v in agent_pod_spec["volumes"] if "projected" in v
                 for s in v["projected"]["sources"] if "serviceAccountToken" in s]
    assert projected and all(t["audience"] == args.token_audience for t in projected)
    sa = one(objects, "ServiceAccount", agent_pod_spec["serviceAccountName"])["metadata"]
    assert f"{sa['namespace']}/{sa['name']}" == "hostmesh-system/hostmesh-agent"
    for path in (args.ca_dir, args.node_tokens):
        assert volume_of(pod, cp, path)[1]["mountPath"] == path
    assert "hostmesh-controlplane.hostmesh-system.svc" in args.tls_san
    ports = {p["name"]: p["containerPort"] for p in cp["ports"]}
    assert ports == {"grpc": 15010, "http-monitoring": 15014}
    svc = one(objects, "Service", "hostmesh-controlplane")
    assert {(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {(15010, "grpc"),
                                                                           (15014, "http-monitoring")}
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    pdb = one(objects, "PodDisruptionBudget", "hostmesh-controlplane")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() and pdb["spec"]["minAvailable"] == 1
    assert cp["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_monitors_scrape_ports_that_exist():
    objects = rendered("iptables")
    sm = one(objects, "ServiceMonitor", "hostmesh-controlplane")
    svc = one(objects, "Service", "hostmesh-controlplane")
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    pm = one(objects, "PodMonitor", "hostmesh-agent")
    agent = container(agent_pod(objects), "agent")
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= {p["name"] for p in agent["ports"]}


def test_rbac_is_least_privilege():
    objects = rendered("iptables")
    agent = one(objects, "ClusterRole", "hostmesh-agent")["rules"]
    assert agent == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    cp = one(objects, "ClusterRole", "hostmesh-controlplane")["rules"]
    verbs = {(g, r): tuple(rule["verbs"]) for rule in cp for g in rule["apiGroups"] for r in rule["resources"]}
    crd_plurals = {o["spec"]["names"]["plural"] for o in objects if o["kind"] == "CustomResourceDefinition"}
    assert {r for (g, r) in verbs if g == "hostmesh.io"} == crd_plurals
    for (group, resource), v in verbs.items():
        if (group, resource) in (("authentication.k8s.io", "tokenreviews"), ("", "events")):
            assert v == ("create",)
        else:
            assert v == ("get", "list", "watch"), (group, resource)
    assert not any(r in ("secrets", "*") for (_, r) in verbs)
    # exactly what the Kubernetes source lists and watches
    from controlplane.sources.kubernetes import resources
    watched = {("" if r.path.startswith("/api/v1/") else r.path.split("/")[2], r.path.rsplit("/", 1)[1])
               for r in resources()}
    assert watched == {k for k, v in verbs.items() if v == ("get", "list", "watch")}
    for name in ("hostmesh-agent", "hostmesh-controlplane"):
        binding = one(objects, "ClusterRoleBinding", name)
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": "hostmesh-system"}]


def test_every_namespaced_object_names_its_namespace():
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for obj in rendered("iptables"):
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == "hostmesh-system", (obj["kind"], obj["metadata"]["name"])
