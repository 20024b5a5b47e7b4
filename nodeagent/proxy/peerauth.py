"""PeerAuthentication: which mTLS mode applies to inbound traffic for a workload and port.

Pure logic over the snapshot's ``ConfigObject(kind="PeerAuthentication")`` entries (their
spec is the control plane's validated, defaulted JSON: ``selector.matchLabels``,
``mtls.mode`` STRICT|PERMISSIVE, ``portLevelMtls{"<port>": {mode}}``). Istio's
precedence, most specific first:

1. ``portLevelMtls[port]`` of the workload policy that applies;
2. ``mtls`` of that workload policy (a PeerAuthentication in the workload's namespace
   whose selector matches the workload's labels; when several match, the first by name,
   since snapshots carry no creation time — Istio takes the oldest);
3. the namespace-wide policy (no selector) in the workload's namespace;
4. the mesh-wide policy: the namespace-wide one in the root namespace, which is the
   namespace the MeshConfig lives in (the control plane allows one namespace-wide policy
   per namespace);
5. PERMISSIVE.

A level without ``mtls`` (a workload policy with only ``portLevelMtls``) inherits from
the next level, as Istio's UNSET does. STRICT: plaintext inbound is refused, mTLS
accepted; PERMISSIVE: both accepted. ``PeerAuthn`` caches the parsed policies per
snapshot object and the answer per (workload, port).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from nodeagent.state import ConfigObject, NodeSnapshot, Workload

log = logging.getLogger(__name__)

STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"
_MODES = (STRICT, PERMISSIVE)
_MAX_CACHED = 65536


@dataclass(frozen=True)
class _Policy:
    name: str
    selector: tuple[tuple[str, str], ...] | None  # None: namespace-wide
    mode: str | None
    ports: dict[int, str]

    def selects(self, labels: dict[str, str]) -> bool:
        return self.selector is not None and selector_matches(self.selector, labels)


Selector = tuple[tuple[str, str], ...]
_SELECTS_NOTHING: Selector = (("\0", "\0"),)


def selector_matches(selector: Selector, labels: dict[str, str]) -> bool:
    """Whether every ``matchLabels`` pair is among the workload's labels."""
    return all(labels.get(k) == v for k, v in selector)


def selector_labels(spec: dict) -> Selector | None:
    """``spec.selector.matchLabels`` as sorted pairs; ``None`` when the policy has no
    selector (namespace-wide); ValueError for a malformed one (not expected: the control
    plane validated it; each caller fails closed its own way)."""
    if "selector" not in spec:
        return None
    labels = spec["selector"].get("matchLabels") if isinstance(spec["selector"], dict) else None
    if not isinstance(labels, dict) or not labels:
        raise ValueError("selector has no matchLabels")
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))


def parse_selector(spec: dict, obj: ConfigObject) -> Selector | None:
    """``selector_labels``; a malformed selector selects nothing, failing closed rather
    than widening to the namespace."""
    try:
        return selector_labels(spec)
    except ValueError:
        log.warning("%s %s/%s: bad selector; it selects nothing", obj.kind, obj.namespace, obj.name)
        return _SELECTS_NOTHING


def root_namespace(snapshot: NodeSnapshot) -> str:
    """The mesh's root namespace: the one the MeshConfig lives in ("" without one)."""
    return next((obj.namespace for obj in snapshot.config if obj.kind == "MeshConfig"), "")


def _mode(value) -> str | None:
    if not isinstance(value, dict):
        return None
    mode = value.get("mode")
    return mode if mode in _MODES else None


def parse_policy(obj: ConfigObject) -> _Policy:
    """One PeerAuthentication -> _Policy. Malformed parts (not expected: the control plane
    validated them) fall back to STRICT for that level, failing closed."""
    try:
        spec = json.loads(obj.spec)
    except ValueError:
        spec = None
    if not isinstance(spec, dict):
        log.warning("PeerAuthentication %s/%s: spec is not a JSON object; treating it as STRICT",
                    obj.namespace, obj.name)
        return _Policy(obj.name, None, STRICT, {})
    selector = parse_selector(spec, obj)
    mode = None
    if "mtls" in spec:
        mode = _mode(spec["mtls"]) or STRICT
    ports: dict[int, str] = {}
    raw_ports = spec.get("portLevelMtls") or {}
    if isinstance(raw_ports, dict):
        for key, value in raw_ports.items():
            try:
                ports[int(key)] = _mode(value) or STRICT
            except (TypeError, ValueError):
                log.warning("PeerAuthentication %s/%s: port %r is not a number; ignored",
                            obj.namespace, obj.name, key)
    return _Policy(obj.name, selector, mode, ports)


class PeerAuthn:
    """The mode for (workload, port), from the snapshot a connection took."""

    def __init__(self) -> None:
        self._snapshot: NodeSnapshot | None = None
        self._wide: dict[str, _Policy] = {}
        self._selecting: dict[str, list[_Policy]] = {}
        self._root = ""
        self._answers: dict[tuple[Workload, int], str] = {}

    def mode(self, snapshot: NodeSnapshot, workload: Workload, port: int) -> str:
        if snapshot is not self._snapshot:
            self._load(snapshot)
        key = (workload, port)
        answer = self._answers.get(key)
        if answer is None:
            if len(self._answers) >= _MAX_CACHED:  # a port scan must not grow it without bound
                self._answers.clear()
            answer = self._answers[key] = self._decide(workload, port)
        return answer

    def _load(self, snapshot: NodeSnapshot) -> None:
        wide: dict[str, _Policy] = {}
        selecting: dict[str, list[_Policy]] = {}
        root = ""
        for obj in snapshot.config:
            if obj.kind == "MeshConfig":
                root = obj.namespace
            if obj.kind != "PeerAuthentication":
                continue
            policy = parse_policy(obj)
            if policy.selector is None:
                if obj.namespace in wide:  # the control plane forbids it; be deterministic anyway
                    log.warning("PeerAuthentication %s/%s: a second namespace-wide policy in %s; %s wins",
                                obj.namespace, obj.name, obj.namespace, min(obj.name, wide[obj.namespace].name))
                    if wide[obj.namespace].name < obj.name:
                        continue
                wide[obj.namespace] = policy
            else:
                selecting.setdefault(obj.namespace, []).append(policy)
        for policies in selecting.values():
            policies.sort(key=lambda p: p.name)
        self._snapshot, self._wide, self._selecting, self._root = snapshot, wide, selecting, root
        self._answers = {}

    def _decide(self, workload: Workload, port: int) -> str:
        labels = dict(workload.labels)
        chosen = next((p for p in self._selecting.get(workload.namespace, ()) if p.selects(labels)), None)
        if chosen is not None:
            if port in chosen.ports:
                return chosen.ports[port]
            if chosen.mode is not None:
                return chosen.mode
        for ns in (workload.namespace, self._root):
            policy = self._wide.get(ns) if ns else None
            if policy is not None and policy.mode is not None:
                return policy.mode
        return PERMISSIVE
