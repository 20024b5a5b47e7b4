"""The Kubernetes source: the mesh's objects from a cluster's API, through kubernetes_asyncio.

What is read (list, then watch, per resource; all namespaces):
- Services (v1) -> our Service: clusterIP, selector, the TCP ports. NodePort and
  LoadBalancer Services are meshed on their cluster IP; ExternalName and headless ones are
  skipped with a warning (the model has no place for them).
- Pods -> Workloads: pod IP, node, service account, labels, named container ports. A pod
  without an IP or a node yet, on the host network, or finished is skipped (logged once).
- EndpointSlices: checked only. Endpoints come from Pods and selectors, as the file source's
  do, so a slice for a Service that does not exist is logged, never served.
- Namespaces (listed and watched for `hostmesh_controlplane_kube_objects`).
- Gateway API HTTPRoute/GRPCRoute and every hostmesh.io Kind: the object as written.

Watch semantics: each resource lists, then watches from the list's resourceVersion with
bookmarks; a stream that ends is resumed from the last version seen (an event's or a
bookmark's); `410 Gone` (expired version) -> list again; a resource the cluster does not
serve (404: its CRD is not installed) counts as empty and is looked for again every 30 s; a dropped connection or an API
error -> retry with backoff, the last good model in force meanwhile. Nothing is reported
until every resource has listed once (no model built from half a cluster).

Validation is the file source's, object by object: an object the model refuses is
skipped, a Warning Event (`InvalidMeshObject`) is posted on it with the messages, and if it
was valid before, its previous version stays in force (as with etcd). Cross-object errors
reject the whole change.

`KubeState` is the part without I/O (fed list results and watch events, returns a
LoadResult); `KubernetesSource` drives it over the API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from controlplane.model import ConfigIssue, LoadResult, MeshModel
from controlplane.model.kinds import GATEWAY_API, HOSTMESH_API, KINDS
from controlplane.model.validate import Checked, Document, validate_document
from controlplane.sources.reporting import ReportingSource

log = logging.getLogger("hostmesh.controlplane.kubernetes")

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 10.0
WATCH_TIMEOUT = 300          # seconds a watch request asks for; resumed afterwards
DEBOUNCE = 0.05              # events arriving together make one rebuild
NOT_SERVED_RECHECK = 30.0    # how often a resource the cluster does not serve is looked for again
DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


def plural(kind: str) -> str:
    low = kind.lower()
    return low[:-1] + "ies" if low.endswith("y") else low + "s"


@dataclass(frozen=True)
class Resource:
    name: str
    path: str
    kind: str


def resources() -> list[Resource]:
    out = [Resource("namespaces", "/api/v1/namespaces", "Namespace"),
           Resource("services", "/api/v1/services", "Service"),
           Resource("pods", "/api/v1/pods", "Pod"),
           Resource("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice")]
    for kind, spec in KINDS.items():
        if spec.api_version == GATEWAY_API:
            out.append(Resource(plural(kind), f"/apis/{GATEWAY_API}/{plural(kind)}", kind))
        elif spec.api_version == HOSTMESH_API:
            out.append(Resource(plural(kind), f"/apis/{HOSTMESH_API}/{plural(kind)}", kind))
    return out


# ---------------------------------------------------------------------- translation
def _meta(obj: dict) -> dict:
    m = obj.get("metadata") or {}
    out = {"name": m.get("name", ""), "namespace": m.get("namespace") or "default"}
    if m.get("labels"):
        out["labels"] = dict(m["labels"])
    ann = {k: v for k, v in (m.get("annotations") or {}).items() if k not in DROPPED_ANNOTATIONS}
    if ann:
        out["annotations"] = ann
    return out


def service_document(svc: dict) -> tuple[dict | None, str]:
    spec = svc.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return None, "ExternalName Services are not meshed"
    if spec.get("clusterIP") == "None":
        return None, "headless Services (clusterIP: None) are not meshed"
    ports = []
    for p in spec.get("ports") or []:
        if p.get("protocol", "TCP") != "TCP":
            continue
        port = {k: p[k] for k in ("name", "port", "targetPort", "appProtocol") if p.get(k) not in (None, "")}
        ports.append(port)
    if not ports:
        return None, "no TCP port"
    out = {"ports": ports, "selector": dict(spec.get("selector") or {})}
    if spec.get("clusterIP"):
        out["clusterIP"] = spec["clusterIP"]
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(svc), "spec": out}, ""


def workload_document(pod: dict) -> tuple[dict | None, str]:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    if spec.get("hostNetwork"):
        return None, "on the host network (its traffic is the node's)"
    if status.get("phase") in ("Succeeded", "Failed"):
        return None, f"{status['phase'].lower()}"
    if not status.get("podIP") or not spec.get("nodeName"):
        return None, "no pod IP or node yet"
    ports, seen = [], set()
    for c in spec.get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") and p.get("protocol", "TCP") == "TCP" and p["containerPort"] not in seen:
                seen.add(p["containerPort"])
                ports.append({"name": p["name"], "port": p["containerPort"]})
    meta = _meta(pod)
    meta.pop("annotations", None)
    return {"apiVersion": HOSTMESH_API, "kind": "Workload", "metadata": meta,
            "spec": {"node": spec["nodeName"], "address": status["podIP"],
                     "serviceAccount": spec.get("serviceAccountName") or "default", "ports": ports}}, ""


def as_written(obj: dict) -> tuple[dict | None, str]:
    return {"apiVersion": obj.get("apiVersion", ""), "kind": obj.get("kind", ""), "metadata": _meta(obj),
            **({"spec": obj["spec"]} if "spec" in obj else {})}, ""


TRANSLATE: dict[str, Callable[[dict], tuple[dict | None, str]]] = {"Service": service_document,
                                                                   "Pod": workload_document}
CHECK_ONLY = ("Namespace", "EndpointSlice")


def _key(obj: dict) -> tuple[str, str]:
    m = obj.get("metadata") or {}
    return m.get("namespace", ""), m.get("name", "")


# ---------------------------------------------------------------------- state (no I/O)
@dataclass
class _Cache:
    objects: dict[tuple[str, str], dict] = field(default_factory=dict)
    version: str = ""
    listed: bool = False


@dataclass(frozen=True)
class Rejection:
    kind: str
    namespace: str
    name: str
    message: str
    involved: dict


class KubeState:
    """Every watched resource's objects, and the model they make."""

    def __init__(self, kinds: list[str]) -> None:
        self.caches = {k: _Cache() for k in kinds}
        self.rejected: dict[tuple[str, str, str], str] = {}     # (kind, ns, name) -> messages
        self.skipped: dict[tuple[str, str, str], str] = {}      # not meshed, and why
        self._good: dict[tuple[str, str, str], Checked] = {}
        self._parsed: dict[tuple[str, str, str], tuple[str, Checked | None, str]] = {}

    @property
    def synced(self) -> bool:
        return all(c.listed for c in self.caches.values())

    def reset(self, kind: str, items: list[dict], version: str) -> None:
        c = self.caches[kind]
        c.objects = {_key(o): o for o in items}
        c.version, c.listed = version, True

    def apply(self, kind: str, event_type: str, obj: dict) -> bool:
        """One watch event; returns True when it changes what the model is made of."""
        c = self.caches[kind]
        version = (obj.get("metadata") or {}).get("resourceVersion", "")
        if version:
            c.version = version
        if event_type == "BOOKMARK":
            return False
        if event_type == "DELETED":
            c.objects.pop(_key(obj), None)
        else:
            c.objects[_key(obj)] = obj
        return True

    def load(self) -> tuple[LoadResult, list[Rejection]]:
        """The model, and the objects newly refused (to be told about, once each)."""
        checked, new_rejections, rejected, skipped = [], [], {}, {}
        for kind, cache in self.caches.items():
            if kind in CHECK_ONLY:
                continue
            for (ns, name), obj in cache.objects.items():
                key = (kind, ns or "default", name)
                version = (obj.get("metadata") or {}).get("resourceVersion", "")
                hit = self._parsed.get(key)
                if hit is None or hit[0] != version or not version:
                    hit = (version, *self._check(kind, obj))
                self._parsed[key] = hit
                _, result, why = hit
                if result is None:
                    skipped[key] = why
                    continue
                if result.issues:
                    message = "; ".join(f"{i.path + ': ' if i.path else ''}{i.message}" for i in result.issues)
                    rejected[key] = message
                    if self.rejected.get(key) != message:
                        new_rejections.append(Rejection(kind, ns or "default", name, message, obj))
                    kept = self._good.get(key)
                    if kept is not None:
                        checked.append(kept)
                    continue
                self._good[key] = result
                checked.append(result)
        self._good = {k: v for k, v in self._good.items() if self._exists(k)}
        for key, why in skipped.items():
            if self.skipped.get(key) != why:
                log.info("not meshed", extra={"object": f"{key[0]} {key[1]}/{key[2]}", "reason": why})
        self.rejected, self.skipped = rejected, skipped
        self._parsed = {k: v for k, v in self._parsed.items() if self._exists(k)}
        return assemble_checked(checked), new_rejections

    def _exists(self, key: tuple[str, str, str]) -> bool:
        kind, ns, name = key
        objects = self.caches[kind].objects
        return (ns, name) in objects or (ns == "default" and ("", name) in objects)

    @staticmethod
    def _check(kind: str, obj: dict) -> tuple[Checked | None, str]:
        doc, why = TRANSLATE.get(kind, as_written)(obj)
        if doc is None:
            return None, why
        ns, name = _key(obj)
        label = f"{kind} {ns or 'default'}/{name}"
        return validate_document(Document(file=label, index=1, data=doc)), ""

    def orphan_slices(self) -> list[str]:
        """EndpointSlices naming a Service that does not exist."""
        services = self.caches["Service"].objects
        out = []
        for (ns, name), sl in self.caches["EndpointSlice"].objects.items():
            owner = ((sl.get("metadata") or {}).get("labels") or {}).get("kubernetes.io/service-name")
            if owner and (ns, owner) not in services:
                out.append(f"{ns}/{name} (Service {ns}/{owner})")
        return sorted(out)


def assemble_checked(checked: list[Checked]) -> LoadResult:
    from controlplane.model.validate import assemble as assemble_validated
    return assemble_validated(checked)


def backoff(attempt: int, rand: Callable[[], float] = random.random) -> float:
    return min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** attempt) * (0.5 + rand() / 2)


class Gone(Exception):
    """410: the resource version is too old; list again."""


class NotServed(Exception):
    """404 on a list: the cluster does not serve this resource (its CRD is not installed)."""


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What a broken watch raises (aiohttp is imported only when the source runs)."""
    import aiohttp
    return (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)


# ---------------------------------------------------------------------- the source
@dataclass(frozen=True)
class KubeSettings:
    kubeconfig: str = ""         # "" = in-cluster (the pod's service account)
    context: str = ""


class KubernetesSource(ReportingSource):
    kind = "kubernetes"

    def __init__(self, settings: KubeSettings, on_change: Callable[[MeshModel], None],
                 on_error: Callable[[list[ConfigIssue]], None], *,
                 on_state: Callable[[], None] = lambda: None) -> None:
        super().__init__(on_change, on_error)
        self.settings = settings
        self.resources = resources()
        self.state = KubeState([r.kind for r in self.resources])
        self.on_state = on_state
        self.api = None
        self.lists = 0
        self.last_error = ""
        self._orphans: list[str] = []
        self._rebuild: asyncio.TimerHandle | None = None

    def describe(self) -> dict:
        return {"kind": self.kind, "kubeconfig": self.settings.kubeconfig or "(in-cluster)",
                "synced": self.state.synced, "lists": self.lists, "last_error": self.last_error or None,
                "resource_versions": {k: c.version for k, c in self.state.caches.items()},
                "rejected": [{"object": f"{k[0]} {k[1]}/{k[2]}", "error": v}
                             for k, v in sorted(self.state.rejected.items())],
                "skipped": [{"object": f"{k[0]} {k[1]}/{k[2]}", "reason": v}
                            for k, v in sorted(self.state.skipped.items())],
                "orphan_endpointslices": self._orphans}

    async def _client(self):
        if self.api is None:
            from kubernetes_asyncio import client, config
            if self.settings.kubeconfig:
                self.api = await config.new_client_from_config(self.settings.kubeconfig,
                                                               context=self.settings.context or None)
            else:
                config.load_incluster_config()
                self.api = client.ApiClient()
        return self.api

    async def initial_load(self) -> None:
        """Nothing to wait for: `run` lists every resource and reports once all have."""

    async def run(self) -> None:
        try:
            await asyncio.gather(*(self._follow(r) for r in self.resources))
        finally:
            if self.api is not None:
                await self.api.close()
                self.api = None

    async def _follow(self, res: Resource) -> None:
        attempt = 0
        while True:
            try:
                await self._list(res)
                attempt = 0
                while True:
                    try:
                        await self._watch(res)   # returns at the server's timeout: resume from the version
                        attempt = 0
                    except _stream_errors() as exc:
                        # a broken stream or connection: watch again from the last version seen
                        # (a list only if that version has expired: 410)
                        self.last_error = f"{res.name}: {_describe(exc)}"
                        log.info("watch broke; resuming from the last version",
                                 extra={"resource": res.name, "error": _describe(exc),
                                        "resource_version": self.state.caches[res.kind].version})
                        self.on_state()
                        await asyncio.sleep(backoff(attempt))
                        attempt += 1
            except Gone:
                log.info("resource version expired; listing again", extra={"resource": res.name})
            except NotServed:
                # the cluster has no such API (the Gateway API CRDs not installed, say): an empty
                # resource, so the rest is served; looked for again in case it gets installed
                if not self.state.caches[res.kind].listed or self.state.caches[res.kind].objects:
                    log.warning("this cluster does not serve a resource; treated as empty",
                                extra={"resource": res.name, "path": res.path})
                self.state.reset(res.kind, [], "")
                self._changed()
                await asyncio.sleep(NOT_SERVED_RECHECK)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API unreachable, an error status, a broken stream
                self.last_error = f"{res.name}: {_describe(exc)}"
                log.warning("Kubernetes API: listing or watching failed; the last good config stays",
                            extra={"resource": res.name, "error": _describe(exc), "attempt": attempt})
                self.on_state()
                await asyncio.sleep(backoff(attempt))
                attempt += 1

    async def _get(self, path: str, query: list, **kw):
        api = await self._client()
        return await api.call_api(path, "GET", query_params=query, response_types_map={200: "object"},
                                  auth_settings=["BearerToken"], _return_http_data_only=True, **kw)

    async def _list(self, res: Resource) -> None:
        try:
            body = await self._get(res.path, [], _request_timeout=30)
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                raise NotServed() from None
            raise
        self.state.reset(res.kind, body.get("items") or [], (body.get("metadata") or {}).get("resourceVersion", ""))
        self.lists += 1
        self.last_error = ""
        self._changed()

    async def _watch(self, res: Resource) -> None:
        version = self.state.caches[res.kind].version
        query = [("watch", "true"), ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(WATCH_TIMEOUT)),
                 *([("resourceVersion", version)] if version else [])]
        api = await self._client()
        import aiohttp
        resp = await api.call_api(res.path, "GET", query_params=query, auth_settings=["BearerToken"],
                                  _preload_content=False, _return_http_data_only=True,
                                  _request_timeout=aiohttp.ClientTimeout(sock_read=WATCH_TIMEOUT + 30))
        try:
            if resp.status != 200:
                raise RuntimeError(f"watch {res.path}: HTTP {resp.status}")
            async for line in resp.content:
                if not line.strip():
                    continue
                ev = json.loads(line)
                kind, obj = ev.get("type"), ev.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise RuntimeError(f"watch {res.path}: {obj.get('reason')}: {obj.get('message')}")
                if self.state.apply(res.kind, kind, obj):
                    self._changed()
        finally:
            resp.release()

    # ------------------------------------------------------------------ rebuilding
    def _changed(self) -> None:
        if self._rebuild is None:
            self._rebuild = asyncio.get_running_loop().call_later(DEBOUNCE, self._build)

    def _build(self) -> None:
        self._rebuild = None
        if not self.state.synced:
            return
        result, rejections = self.state.load()
        for r in rejections:
            log.error("a Kubernetes object was refused; it is skipped (its last valid version stays)",
                      extra={"object": f"{r.kind} {r.namespace}/{r.name}", "error": r.message})
            asyncio.get_running_loop().create_task(self._warn(r))
        orphans = self.state.orphan_slices()
        for o in set(orphans) - set(self._orphans):
            log.warning("an EndpointSlice names a Service that does not exist; ignored", extra={"slice": o})
        self._orphans = orphans
        self._report(result)
        self.on_state()

    async def _warn(self, r: Rejection) -> None:
        """A Warning Event on the refused object, where `kubectl describe` shows it."""
        meta = r.involved.get("metadata") or {}
        event = {"apiVersion": "v1", "kind": "Event",
                 "metadata": {"generateName": f"{r.name}.", "namespace": r.namespace},
                 "involvedObject": {"apiVersion": r.involved.get("apiVersion", ""), "kind": r.kind,
                                    "namespace": r.namespace, "name": r.name, "uid": meta.get("uid", ""),
                                    "resourceVersion": meta.get("resourceVersion", "")},
                 "type": "Warning", "reason": "InvalidMeshObject", "message": r.message[:1024],
                 "source": {"component": "hostmesh-controlplane"}}
        try:
            api = await self._client()
            await api.call_api(f"/api/v1/namespaces/{r.namespace}/events", "POST", body=event,
                               auth_settings=["BearerToken"], response_types_map={201: "object"},
                               _return_http_data_only=True, _request_timeout=10)
        except Exception as exc:
            log.warning("could not post the Event", extra={"object": f"{r.kind} {r.namespace}/{r.name}",
                                                           "error": _describe(exc)})


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
