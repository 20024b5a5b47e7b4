"""The control-plane process: file source -> model -> per-node snapshots -> cache -> gRPC,
plus the HTTP port (15014) for /metrics, /ready, /healthz and /debug.

Security (``Security``): the CA directory (controlplane/ca.py), the node token directory
(controlplane/auth.py) and the names the TLS certificate of 15010 carries. With it, 15010
is TLS only, every call needs a node token, and the Certificates service signs workload
certificates for identities scheduled on the calling node. Without it (``--insecure``,
tests only) 15010 is plaintext, unauthenticated, and issues no certificates.

A broken config change never reaches the agents: the file source reports it (log line,
/debug/config, `hostmesh_controlplane_config_errors`, `hostmesh status`) and the last good
model and snapshots stay in force.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, Counter, Gauge

from controlplane.auth import NodeIdentities, NodeTokens, TokenFileError
from controlplane.builder import build_snapshot, build_snapshots, check_consistency
from controlplane.ca import CAError, CertificateAuthority
from controlplane.cache import SnapshotCache, SnapshotRejected
from controlplane.certservice import CertificateService, ServingCertificate
from controlplane.grpcserver import DiscoveryServer
from controlplane.metrics import ControlPlaneMetrics
from controlplane.model.objects import ConfigIssue, MeshModel
from controlplane.sources import FileSource
from hostmesh import __version__
from nodeagent.admin import AdminServer, Route, RouteTable, error_response, json_response, metrics_response, \
    text_response
from nodeagent.state import NodeSnapshot

log = logging.getLogger("hostmesh.controlplane")

#: how often the CA dir and the token dir are checked for changes (rotation, new nodes)
SECURITY_RELOAD_INTERVAL = 2.0


@dataclass(frozen=True)
class Security:
    ca_dir: str
    tokens_dir: str
    tls_names: Sequence[str] = ("hostmesh-controlplane",)


class ControlPlane:
    def __init__(self, config_dir: str, *, grpc_address: str = "0.0.0.0:15010",
                 http_host: str = "0.0.0.0", http_port: int = 15014, security: Security | None = None) -> None:
        self.config_dir = config_dir
        self.security = security
        self.grpc_address = grpc_address
        self.registry = CollectorRegistry()
        self.metrics = ControlPlaneMetrics(self.registry)
        self.config_errors = Counter("hostmesh_controlplane_config_errors",
                                     "Config loads rejected as invalid (the last good config stays)",
                                     registry=self.registry)
        self.config_valid = Gauge("hostmesh_controlplane_config_valid",
                                  "1 when the config directory currently loads without errors", registry=self.registry)
        self.model: MeshModel | None = None
        self.identities: NodeIdentities | None = None
        self.model_loaded_at: float | None = None
        self.errors: list[ConfigIssue] = []
        self.started = time.time()
        self.cache = SnapshotCache(consistency_check=check_consistency, snapshot_for_new_node=self._new_node,
                                   metrics=self.metrics)
        self.source = FileSource(config_dir, on_change=self._on_model, on_error=self._on_errors)
        self.ca: CertificateAuthority | None = None
        self.tokens: NodeTokens | None = None
        self.serving: ServingCertificate | None = None
        if security is None:
            self.grpc = DiscoveryServer(self.cache, self.metrics)
        else:
            # CA and token problems stop the start here, before any port is bound
            self.ca = CertificateAuthority(security.ca_dir)
            self.tokens = NodeTokens(security.tokens_dir)
            self.serving = ServingCertificate(self.ca, security.tls_names)
            certs = CertificateService(self.ca, self.tokens, lambda: self.identities, self.metrics)
            self.grpc = DiscoveryServer(self.cache, self.metrics, server_credentials=self.serving.credentials(),
                                        authenticate=self.tokens.authenticate, extra_handlers=[certs.handler()])
        self.http = AdminServer(None, http_host, http_port, dispatcher=self._routes(),
                                name="control plane http")
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ config
    def _on_model(self, model: MeshModel) -> None:
        self.model = model
        self.model_loaded_at = time.time()
        self.errors = []
        self.config_valid.set(1)
        self.identities = NodeIdentities.from_model(model)
        snaps = build_snapshots(model, self.cache.nodes())
        try:
            self.cache.set_snapshots(snaps)
        except SnapshotRejected as exc:  # counted by the cache; the previous snapshots stay
            log.error("snapshots refused by the consistency check", extra={"error": str(exc)})
            return
        log.info("config applied", extra={"model_version": model.version, "nodes": len(snaps),
                                          "objects": model.counts()})

    def _on_errors(self, errors: list[ConfigIssue]) -> None:
        self.errors = list(errors)
        self.config_valid.set(0)
        self.config_errors.inc()
        for e in errors:
            log.error("config error; the last good config stays in force", extra={"error": str(e)})

    def _new_node(self, node: str) -> NodeSnapshot | None:
        return build_snapshot(self.model, node) if self.model is not None else None

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        self.source.load_now()
        await self.grpc.start(self.grpc_address)
        try:
            await self.http.start()
        except BaseException:
            await self.grpc.stop(0)
            raise
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        watchers = [asyncio.create_task(self.source.run())]
        if self.security is not None:
            watchers.append(asyncio.create_task(self._watch_security()))
        log.info("control plane started", extra={"config_dir": self.config_dir, "grpc": self.grpc_address,
                                                  "http": self.http.address, "valid": not self.errors,
                                                  "tls": self.security is not None})
        await self._stop.wait()
        for w in watchers:
            w.cancel()
        await self.grpc.stop(2.0)
        await self.http.close()
        return 0

    async def _watch_security(self) -> None:
        """Follow CA rotations and token changes; a broken change keeps what is loaded."""
        while True:
            await asyncio.sleep(SECURITY_RELOAD_INTERVAL)
            self.reload_security()

    def reload_security(self) -> None:
        for what, reload in (("CA directory", self.ca.reload_if_changed), ("node tokens", self.tokens.reload_if_changed)):
            try:
                if reload():
                    log.info(f"{what} reloaded")
            except (CAError, TokenFileError) as exc:
                log.error(f"{what} change refused; the loaded one stays in force", extra={"error": str(exc)})

    # ------------------------------------------------------------------ HTTP views
    def _routes(self) -> RouteTable:
        return RouteTable({
            "/healthz": Route("GET", lambda q: text_response(200, "ok"), "liveness"),
            "/ready": Route("GET", self._ready, "200 when a valid config is loaded and served"),
            "/metrics": Route("GET", lambda q: metrics_response(self.registry), "Prometheus metrics"),
            "/debug/config": Route("GET", lambda q: json_response(200, self.config_view()), "config state and errors"),
            "/debug/agents": Route("GET", lambda q: json_response(200, self.agents_view()), "connected agents"),
            "/debug/snapshot": Route("GET", self._snapshot_view, "a node's snapshot: ?node=NAME"),
        }, name="control plane http")

    def _ready(self, query: str):
        if self.model is None:
            reason = "no valid config loaded" + (f": {self.errors[0]}" if self.errors else "")
            return text_response(503, reason)
        return text_response(200, "ready")

    def config_view(self) -> dict:
        return {
            "version": __version__, "config_dir": self.config_dir, "valid": not self.errors,
            "model_version": self.model.version if self.model else None,
            "loaded_at": _iso(self.model_loaded_at), "objects": self.model.counts() if self.model else {},
            "errors": [e.to_dict() | {"message": str(e)} for e in self.errors],
            "latest": self.cache.versions(),
            "ca": self.ca.status() if self.ca else None,
        }

    def agents_view(self) -> list[dict]:
        return self.cache.statuses()

    def _snapshot_view(self, query: str):
        node = (parse_qs(query).get("node") or [""])[0]
        snap = self.cache.get_snapshot(node) if node else None
        if snap is None:
            return error_response(404, f"no snapshot for node {node!r}", nodes=self.cache.nodes())
        return json_response(200, snap.to_dict())


def _iso(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None


def run_controlplane(config_dir: str, grpc_address: str, http_address: tuple[str, int], log_level: str,
                     security: Security | None = None) -> int:
    import uvloop

    from nodeagent import logs
    logs.setup(log_level)
    cp = ControlPlane(config_dir, grpc_address=grpc_address, http_host=http_address[0], http_port=http_address[1],
                      security=security)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(cp.run())
