"""An in-repo fake Kubernetes API server, for testing the control plane's Kubernetes source
with the real client library (kubernetes_asyncio) where no kube-apiserver can run.

What it implements, as the real one does:
- list at `/api/v1/<plural>` and `/apis/<group>/<version>/<plural>` (all namespaces), with
  `metadata.resourceVersion` of the list;
- watch (`?watch=true&resourceVersion=N`): the events after N, then new ones as they
  happen, as JSON lines; `allowWatchBookmarks=true` adds BOOKMARK events; `timeoutSeconds`
  ends the stream; a resourceVersion older than the compacted history gets an ERROR event
  with a 410 `Expired` Status (the client must list again);
- `POST /api/v1/namespaces/<ns>/events` (recorded, for the source's warnings);
- bearer-token authentication (401 without the token).

Test controls: `apply(obj)`, `delete(...)`, `compact()` (forget history: older watches get
410), `drop_watches()` (end every open watch mid-stream), `stop()`/`start()` on the same port.
Resource versions are one global counter, as etcd's revision is.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

def main(argv: list[str] | None = None) -> int:
    """`python -m meshlab.fakekube --port P --kubeconfig OUT [--objects FILE.yaml ...]`: serve
    until killed (the lab's Kubernetes mode); POST /fake/apply changes an object."""
    import argparse

    import yaml
    from controlplane.model.kinds import HOSTMESH_API, KINDS
    p = argparse.ArgumentParser(prog="python -m meshlab.fakekube")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--kubeconfig", required=True, help="where to write a kubeconfig for this server")
    p.add_argument("--objects", nargs="*", default=[], help="YAML files of hostmesh documents to serve")
    args = p.parse_args(argv)
    kube = FakeKube(hostmesh_kinds=[k for k, s in KINDS.items() if s.api_version == HOSTMESH_API])
    kube.port = args.port
    for path in args.objects:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    kube.apply(from_mesh_document(doc))
    kube.start()
    with open(args.kubeconfig + ".tmp", "w") as f:
        f.write(kube.kubeconfig())
    import os
    os.replace(args.kubeconfig + ".tmp", args.kubeconfig)
    threading.Event().wait()
    return 0


# the resources served: list path -> kind
RESOURCES = {
    "/api/v1/namespaces": "Namespace",
    "/api/v1/services": "Service",
    "/api/v1/pods": "Pod",
    "/apis/discovery.k8s.io/v1/endpointslices": "EndpointSlice",
    "/apis/gateway.networking.k8s.io/v1/httproutes": "HTTPRoute",
    "/apis/gateway.networking.k8s.io/v1/grpcroutes": "GRPCRoute",
}
HOSTMESH_GROUP = "/apis/hostmesh.io/v1alpha1/"


def plural(kind: str) -> str:
    low = kind.lower()
    return low[:-1] + "ies" if low.endswith("y") else low + "s"


class FakeKube:
    def __init__(self, *, token: str = "test-token", bookmark_interval: float = 0.5,
                 hostmesh_kinds: Iterable[str] = ()) -> None:
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.paths = dict(RESOURCES)
        for kind in hostmesh_kinds:
            self.paths[HOSTMESH_GROUP + plural(kind)] = kind
        self.kind_paths = {kind: path for path, kind in self.paths.items()}
        self._cond = threading.Condition()
        self.rv = 1
        self.objects: dict[str, dict[tuple[str, str], dict]] = {p: {} for p in self.paths}
        self.history: list[tuple[int, str, str, dict]] = []   # (rv, path, type, object)
        self.floor = 0            # history before this rv is compacted
        self.generation = 0       # bumped by drop_watches: open watches end
        self.events: list[dict] = []
        self.tokens: dict[str, dict] = {}      # TokenReview: token -> who it is
        self.reviews: list[str] = []
        self.requests: list[tuple[str, str]] = []   # (method, path?query)
        self.port = 0
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ controls
    def apply(self, obj: dict) -> dict:
        kind, meta = obj["kind"], obj.setdefault("metadata", {})
        path = self.kind_paths[kind]
        key = (meta.get("namespace", ""), meta["name"])
        with self._cond:
            self.rv += 1
            kind_ev = "MODIFIED" if key in self.objects[path] else "ADDED"
            meta["resourceVersion"] = str(self.rv)
            stored = json.loads(json.dumps(obj))
            self.objects[path][key] = stored
            self.history.append((self.rv, path, kind_ev, stored))
            self._cond.notify_all()
        return stored

    def delete(self, kind: str, namespace: str, name: str) -> None:
        path = self.kind_paths[kind]
        with self._cond:
            obj = self.objects[path].pop((namespace, name))
            self.rv += 1
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
            self.history.append((self.rv, path, "DELETED", obj))
            self._cond.notify_all()

    def add_token(self, token: str, *, namespace: str, service_account: str, node: str,
                  audiences: tuple[str, ...] = ("hostmesh",)) -> None:
        """A projected service-account token the TokenReview endpoint will vouch for."""
        self.tokens[token] = {"username": f"system:serviceaccount:{namespace}:{service_account}",
                              "node": node, "audiences": list(audiences)}

    def review(self, body: dict) -> dict:
        spec = body.get("spec") or {}
        info = self.tokens.get(spec.get("token", ""))
        wanted = spec.get("audiences") or []
        ok = info is not None and (not wanted or set(wanted) & set(info["audiences"]))
        status = {"authenticated": False, "error": "invalid bearer token"} if not ok else {
            "authenticated": True, "audiences": [a for a in wanted if a in info["audiences"]] or info["audiences"],
            "user": {"username": info["username"], "uid": "uid",
                     "groups": ["system:serviceaccounts", "system:authenticated"],
                     "extra": {"authentication.kubernetes.io/node-name": [info["node"]]}}}
        self.reviews.append(spec.get("token", ""))
        return {**body, "status": status}

    def compact(self) -> None:
        """Forget all history (as an etcd compaction at the current revision does, plus one
        write, so every version a client has seen so far is now too old: 410)."""
        with self._cond:
            self.rv += 1
            self.floor = self.rv
            self.history = []

    def drop_watches(self) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def watches(self) -> list[str]:
        return [q for m, q in self.requests if "watch=true" in q]

    # ------------------------------------------------------------------ server
    def start(self) -> FakeKube:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self.drop_watches()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self) -> str:
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        })


def from_mesh_document(doc: dict) -> dict:
    """A hostmesh config document as the API server would hold it: a Workload as the Pod it
    stands for, a Service with the fields Kubernetes fills in, other kinds as they are."""
    meta = {"namespace": "default", **doc["metadata"], "uid": f"uid-{doc['metadata']['name']}"}
    if doc["kind"] == "Workload":
        s = doc["spec"]
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                "spec": {"nodeName": s["node"], "serviceAccountName": s.get("serviceAccount", "default"),
                         "containers": [{"name": "app", "ports": [
                             {"name": p["name"], "containerPort": p["port"], "protocol": "TCP"}
                             for p in s.get("ports", [])]}]},
                "status": {"phase": "Running", "podIP": s["address"]}}
    if doc["kind"] == "Service":
        spec = {"type": "ClusterIP", "sessionAffinity": "None", "ipFamilies": ["IPv4"], **doc["spec"],
                "ports": [{"protocol": "TCP", **p} for p in doc["spec"]["ports"]]}
        return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec,
                "status": {"loadBalancer": {}}}
    return {**doc, "metadata": meta}


def _handler(kube: FakeKube):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _auth(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {kube.token}":
                return True
            self._json(401, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 401,
                             "reason": "Unauthorized", "message": "Unauthorized"})
            return False

        def _json(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            kube.requests.append(("GET", self.path))
            if not self._auth():
                return
            url = urlsplit(self.path)
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if url.path not in kube.paths:
                self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": url.path})
                return
            if q.get("watch") in ("true", "1"):
                self._watch(url.path, q)
                return
            with kube._cond:
                items = list(kube.objects[url.path].values())
                rv = kube.rv
            self._json(200, {"kind": kube.paths[url.path] + "List", "apiVersion": "v1",
                             "metadata": {"resourceVersion": str(rv)}, "items": items})

        def do_POST(self) -> None:
            kube.requests.append(("POST", self.path))
            if not self._auth():
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if urlsplit(self.path).path == "/apis/authentication.k8s.io/v1/tokenreviews":
                self._json(201, kube.review(body))
                return
            if urlsplit(self.path).path == "/fake/apply":   # test control, not a Kubernetes API
                self._json(200, kube.apply(body))
                return
            if urlsplit(self.path).path.endswith("/events"):
                kube.events.append(body)
                self._json(201, body)
                return
            self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound"})

        def _watch(self, path: str, q: dict) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            since = int(q.get("resourceVersion") or 0)
            deadline = time.monotonic() + float(q.get("timeoutSeconds") or 300)
            bookmarks = q.get("allowWatchBookmarks") == "true"
            try:
                with kube._cond:
                    generation = kube.generation
                    if since and since < kube.floor:
                        self._event({"type": "ERROR", "object": {
                            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                            "reason": "Expired", "message": f"too old resource version: {since} ({kube.floor})"}})
                        self._end()
                        return
                sent = since
                next_bookmark = time.monotonic() + kube.bookmark_interval
                while time.monotonic() < deadline:
                    bookmark = None
                    with kube._cond:
                        if kube.generation != generation:
                            self._drop()
                            return
                        new = [(rv, t, o) for rv, p, t, o in kube.history if p == path and rv > sent]
                        if not new and bookmarks and time.monotonic() >= next_bookmark:
                            bookmark = kube.rv   # nothing of ours is pending up to here
                        elif not new:
                            kube._cond.wait(0.1)
                    for rv, t, o in new:
                        self._event({"type": t, "object": o})
                        sent = rv
                    if bookmark is not None:
                        self._event({"type": "BOOKMARK", "object": {
                            "kind": kube.paths[path], "apiVersion": "v1",
                            "metadata": {"resourceVersion": str(bookmark)}}})
                        sent = max(sent, bookmark)
                        next_bookmark = time.monotonic() + kube.bookmark_interval
                self._end()
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _drop(self) -> None:
            """The connection breaks mid-stream: no terminating chunk, the socket closed."""
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _event(self, ev: dict) -> None:
            line = json.dumps(ev).encode() + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()

        def _end(self) -> None:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler


if __name__ == "__main__":
    import sys
    sys.exit(main())
