"""The validated config model: immutable objects, the model holding them, and config issues.

`MeshObject` is one validated document (kind, namespace, name, labels and the canonical
spec as sorted JSON). `MeshModel` holds every object, sorted, and is hashable and
comparable: loading the same files twice gives equal models with the same `version`.
Where an object came from (`source`) is kept for messages but is not part of equality.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from controlplane.model import kinds
from controlplane.model.fields import parse_duration
from nodeagent.state import ConfigObject


@dataclass(frozen=True, order=True)
class ConfigIssue:
    """One problem found in the config. `str()` is the message shown to users:

    ``routes.yaml:14: HTTPRoute default/canary: spec.rules[0].backendRefs[1].weight: -5 is not between 0 and 1000000``
    """

    file: str
    line: int = 0            # 1-based; 0 when unknown
    column: int = 0          # 1-based; only YAML syntax errors carry one
    object: str = ""         # "HTTPRoute default/canary", "document 2", or ""
    path: str = ""           # "spec.rules[0].weight", or "" for the whole object
    message: str = ""
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}"
            if self.column:
                where += f":{self.column}"
        parts = [where]
        if self.object:
            parts.append(self.object)
        if self.path:
            parts.append(self.path)
        parts.append(self.message)
        return ": ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "column": self.column, "object": self.object,
                "path": self.path, "message": self.message, "severity": self.severity, "text": str(self)}


@dataclass(frozen=True)
class Source:
    file: str
    line: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class MeshObject:
    kind: str
    namespace: str
    name: str
    spec_json: str            # canonical JSON of the validated, defaulted spec
    api_version: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    source: Source = field(default=Source(""), compare=False, repr=False)

    @property
    def spec(self) -> dict[str, Any]:
        """A fresh copy of the spec (the object itself stays immutable)."""
        return json.loads(self.spec_json)

    @property
    def spec_view(self) -> dict[str, Any]:
        """The parsed spec, cached and shared: read it, never mutate it (use `spec` for a copy)."""
        v = self.__dict__.get("_spec")
        if v is None:
            v = json.loads(self.spec_json)
            object.__setattr__(self, "_spec", v)
        return v

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def ref(self) -> str:
        """"HTTPRoute default/canary"."""
        return object_label(self.kind, self.namespace, self.name)

    @property
    def labels_dict(self) -> dict[str, str]:
        return dict(self.labels)

    def labels_set(self) -> frozenset[tuple[str, str]]:
        v = self.__dict__.get("_labels_set")
        if v is None:
            v = frozenset(self.labels)
            object.__setattr__(self, "_labels_set", v)
        return v

    def to_config_object(self) -> ConfigObject:
        return ConfigObject(kind=self.kind, namespace=self.namespace, name=self.name, spec=self.spec_json)

    def to_document(self) -> dict[str, Any]:
        """The object as a Kubernetes-shaped document (what a user would write, defaults filled in)."""
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if self.labels:
            meta["labels"] = dict(self.labels)
        if self.annotations:
            meta["annotations"] = dict(self.annotations)
        return {"apiVersion": self.api_version, "kind": self.kind, "metadata": meta, "spec": self.spec}


def object_label(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}"


@dataclass(frozen=True)
class MeshSettings:
    """The effective mesh-wide settings (MeshConfig "default", or the defaults without one)."""

    trust_domain: str = kinds.DEFAULT_TRUST_DOMAIN
    service_cidr: str = kinds.DEFAULT_SERVICE_CIDR
    certificate_ttl: str = kinds.DEFAULT_CERTIFICATE_TTL
    outbound_traffic_policy: str = "ALLOW_ANY"
    escaped_slashes: str = "REJECT"  # pathNormalization.escapedSlashes

    @property
    def certificate_ttl_seconds(self) -> float:
        return parse_duration(self.certificate_ttl)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> MeshSettings:
        return cls(trust_domain=spec["trustDomain"], service_cidr=spec["serviceCIDR"],
                   certificate_ttl=spec["certificateTTL"],
                   outbound_traffic_policy=spec["outboundTrafficPolicy"]["mode"],
                   escaped_slashes=spec["pathNormalization"]["escapedSlashes"])

    def to_spec(self) -> dict[str, Any]:
        return {"trustDomain": self.trust_domain, "serviceCIDR": self.service_cidr,
                "certificateTTL": self.certificate_ttl,
                "outboundTrafficPolicy": {"mode": self.outbound_traffic_policy},
                "pathNormalization": {"escapedSlashes": self.escaped_slashes}}


@dataclass(frozen=True)
class MeshModel:
    """Every validated object, sorted by (kind, namespace, name). Equal content -> equal models."""

    objects: tuple[MeshObject, ...] = ()

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.objects, key=lambda o: o.key))
        object.__setattr__(self, "objects", ordered)

    # -- lookups (indexes built once per model; the model is immutable)
    def _index(self) -> dict[str, Any]:
        idx = self.__dict__.get("_idx")
        if idx is None:
            by_kind: dict[str, list[MeshObject]] = {}
            by_key: dict[tuple[str, str, str], MeshObject] = {}
            for o in self.objects:
                by_kind.setdefault(o.kind, []).append(o)
                by_key[o.key] = o
            idx = {"kind": {k: tuple(v) for k, v in by_kind.items()}, "key": by_key}
            object.__setattr__(self, "_idx", idx)
        return idx

    def of_kind(self, kind: str) -> tuple[MeshObject, ...]:
        return self._index()["kind"].get(kind, ())

    def get(self, kind: str, namespace: str, name: str) -> MeshObject | None:
        return self._index()["key"].get((kind, namespace, name))

    @property
    def services(self) -> tuple[MeshObject, ...]:
        return self.of_kind("Service")

    @property
    def workloads(self) -> tuple[MeshObject, ...]:
        return self.of_kind("Workload")

    @property
    def mesh_config(self) -> MeshObject | None:
        """The MeshConfig object (at most one exists, in any namespace), or None."""
        found = self.of_kind("MeshConfig")
        return found[0] if found else None

    @property
    def settings(self) -> MeshSettings:
        mc = self.mesh_config
        return MeshSettings.from_spec(mc.spec_view) if mc is not None else MeshSettings()

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes that Workloads are placed on, sorted."""
        return tuple(sorted({w.spec_view["node"] for w in self.workloads}))

    def config_objects(self) -> tuple[ConfigObject, ...]:
        """Routes, policies and the MeshConfig as agents receive them, sorted by (kind, namespace, name).
        Without a MeshConfig object, the defaults are carried as MeshConfig default/default."""
        out = [o.to_config_object() for o in self.objects if kinds.KINDS[o.kind].carried]
        if self.mesh_config is None:
            out.append(ConfigObject(kind="MeshConfig", namespace="default", name="default",
                                    spec=canonical_json(MeshSettings().to_spec())))
        return tuple(sorted(out, key=lambda c: (c.kind, c.namespace, c.name)))

    @property
    def version(self) -> str:
        """A content hash of the model (sources excluded)."""
        v = self.__dict__.get("_version")
        if v is None:
            h = hashlib.sha256()
            for o in self.objects:
                h.update(canonical_json([o.api_version, o.kind, o.namespace, o.name, o.labels,
                                         o.annotations]).encode())
                h.update(o.spec_json.encode())
                h.update(b"\n")
            v = h.hexdigest()[:16]
            object.__setattr__(self, "_version", v)
        return v

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in sorted(self._index()["kind"].items())}

    def to_documents(self) -> list[dict[str, Any]]:
        return [o.to_document() for o in self.objects]

    def __len__(self) -> int:
        return len(self.objects)

    def __iter__(self):
        return iter(self.objects)


@dataclass(frozen=True)
class LoadResult:
    """The outcome of one load: a model when there is no error, and every issue found."""

    model: MeshModel | None
    errors: list[ConfigIssue] = field(default_factory=list)
    warnings: list[ConfigIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.model is not None and not self.errors

    def error_text(self) -> str:
        return "\n".join(str(e) for e in self.errors)


def sorted_issues(issues: Iterable[ConfigIssue]) -> list[ConfigIssue]:
    """Stable order for reporting: by file, line, column; same place keeps discovery order."""
    return sorted(issues, key=lambda i: (i.file, i.line, i.column))
