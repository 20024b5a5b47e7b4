"""Which Workloads a Service selects, and which port a Service port's targetPort means on each.

Shared by validation (a named targetPort no selected Workload defines is an error) and
the snapshot builder (endpoints), so both agree by construction.

Rules (the Kubernetes ones): a Service selects the Workloads in its own namespace whose
labels include every selector label; an empty selector selects nothing. An integer
targetPort is used as is; a named one resolves to the port of that name on each
Workload, and a Workload without that name gives no endpoint for that port.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from controlplane.model.objects import MeshObject


class WorkloadIndex:
    """Label postings per namespace, so selecting is cheap for thousands of Workloads."""

    def __init__(self, workloads: Iterable[MeshObject]) -> None:
        self._postings: dict[tuple[str, str, str], list[MeshObject]] = {}
        for w in sorted(workloads, key=lambda o: (o.namespace, o.name)):
            for k, v in w.labels:
                self._postings.setdefault((w.namespace, k, v), []).append(w)

    def select(self, namespace: str, selector: dict[str, str]) -> list[MeshObject]:
        """The selected Workloads, sorted by name."""
        if not selector:
            return []
        lists = []
        for k, v in selector.items():
            posting = self._postings.get((namespace, k, v))
            if not posting:
                return []
            lists.append(posting)
        lists.sort(key=len)
        first, rest = lists[0], lists[1:]
        if not rest:
            return list(first)
        want = selector.items()
        return [w for w in first if want <= w.labels_set()]


def workload_ports(workload: MeshObject) -> dict[str, int]:
    return {p["name"]: p["port"] for p in workload.spec_view.get("ports", ())}


def resolve_target_port(target: Any, workload: MeshObject) -> int | None:
    """The port to dial on `workload` for a Service port's targetPort (None: not defined there)."""
    if isinstance(target, int):
        return target
    return workload_ports(workload).get(target)
