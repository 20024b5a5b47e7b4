"""The control-plane process: config source -> model -> per-node snapshots -> cache -> gRPC,
plus the HTTP port (15014) for /metrics, /ready, /healthz and /debug.

The source is a directory of YAML files (sources/files.py), etcd (sources/etcd.py,
``Etcd``), or the Kubernetes API (sources/kubernetes.py, ``KubeSettings``). With etcd, several replicas can run: each serves agents from the same etcd
state, and one, elected on an etcd lease (election.py), writes the config status back.

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
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs

from prometheus_client import Counter, Gauge

from controlplane.auth import NodeIdentities, NodeTokens, TokenFileError
from controlplane.health import DEFAULT_DISCONNECT_GRACE, HealthStore
from controlplane.healthsync import HealthMetrics, HealthSync
from controlplane.builder import build_snapshot, build_snapshots, check_consistency
from controlplane.ca import CAError, CertificateAuthority
from controlplane.cache import SnapshotCache, SnapshotRejected
from controlplane.certservice import CertificateService, ServingCertificate
from controlplane.election import DEFAULT_TTL, LeaderElection
from controlplane.errors import ControlPlaneError
from controlplane.tokenreview import REVIEW_PATH, Authenticator, ReviewPolicy, TokenReviewer
from controlplane.etcd import DEFAULT_PREFIX, EtcdClient, EtcdError, EtcdTLS, put_op
from controlplane.grpcserver import DiscoveryServer
from controlplane.metrics import ControlPlaneMetrics
from controlplane.model.objects import ConfigIssue, MeshModel
from controlplane.sources import FileSource
from controlplane.sources.etcd import EtcdSource
from controlplane.sources.kubernetes import KubernetesSource, KubeSettings
from hostmesh import __version__
from nodeagent.admin import AdminServer, Route, RouteTable, error_response, json_response, metrics_response, \
    text_response
from nodeagent.state import NodeSnapshot
from nodeagent.telemetry import MetricsRegistry

log = logging.getLogger("hostmesh.controlplane")

#: how often the CA dir and the token dir are checked for changes (rotation, new nodes)
SECURITY_RELOAD_INTERVAL = 2.0


@dataclass(frozen=True)
class Security:
    ca_dir: str
    tokens_dir: str
    tls_names: Sequence[str] = ("hostmesh-controlplane",)
    token_review: ReviewPolicy | None = None   # also accept agents' Kubernetes SA tokens


@dataclass(frozen=True)
class Etcd:
    """etcd as the config source, and the replica's part in leader election."""

    endpoints: Sequence[str]
    prefix: str = DEFAULT_PREFIX
    tls: EtcdTLS | None = None
    replica: str = ""               # this replica's name in the election (default: host-pid)
    lease_ttl: int = DEFAULT_TTL


class ControlPlane:
    def __init__(self, config_dir: str | None, *, grpc_address: str = "0.0.0.0:15010",
                 http_host: str = "0.0.0.0", http_port: int = 15014, security: Security | None = None,
                 etcd: Etcd | None = None, kubernetes: KubeSettings | None = None,
                 health_grace: float = DEFAULT_DISCONNECT_GRACE) -> None:
        self.config_dir = config_dir
        self.etcd = etcd
        self.security = security
        self.grpc_address = grpc_address
        self.registry = MetricsRegistry()  # no *_created series, as the agents'
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
        # endpoint health: this replica's agents' reports, and with etcd every replica's
        self.health = HealthStore(disconnect_grace=health_grace)
        self.health_metrics = HealthMetrics(self.registry, self.health, etcd=etcd is not None)
        self.health_sync: HealthSync | None = None
        self.cache = SnapshotCache(consistency_check=check_consistency, snapshot_for_new_node=self._new_node,
                                   metrics=self.metrics)
        self.election: LeaderElection | None = None
        if etcd is not None:
            self._init_etcd(etcd)
        elif kubernetes is not None:
            self.source = KubernetesSource(kubernetes, on_change=self._on_model, on_error=self._on_errors)
        else:
            self.source = FileSource(config_dir, on_change=self._on_model, on_error=self._on_errors)
        self.ca: CertificateAuthority | None = None
        self.tokens: NodeTokens | None = None
        self.serving: ServingCertificate | None = None
        if security is None:
            self.grpc = DiscoveryServer(self.cache, self.metrics, on_health=self._on_health,
                                        on_stream_end=self._on_stream_end)
        else:
            # CA and token problems stop the start here, before any port is bound
            self.ca = CertificateAuthority(security.ca_dir)
            self.tokens = NodeTokens(security.tokens_dir)
            self.serving = ServingCertificate(self.ca, security.tls_names)
            self.auth = Authenticator(self.tokens, self._token_reviewer(security, kubernetes))
            certs = CertificateService(self.ca, self.auth, lambda: self.identities, self.metrics)
            self.grpc = DiscoveryServer(self.cache, self.metrics, server_credentials=self.serving.credentials(),
                                        authenticate=self.auth.authenticate, extra_handlers=[certs.handler()],
                                        on_health=self._on_health, on_stream_end=self._on_stream_end)
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
        snaps = self._publish(model)
        if snaps is None:
            return
        if self.election is not None:
            self._status_dirty.set()
        log.info("config applied", extra={"model_version": model.version, "nodes": len(snaps),
                                          "objects": model.counts()})

    def _publish(self, model: MeshModel) -> dict | None:
        """Snapshots of ``model`` plus the reported endpoint health, into the cache (None: refused)."""
        snaps = build_snapshots(model, self.cache.nodes(), self.health.config_objects(model))
        try:
            self.cache.set_snapshots(snaps)
        except SnapshotRejected as exc:  # counted by the cache; the previous snapshots stay
            log.error("snapshots refused by the consistency check", extra={"error": str(exc)})
            return None
        return snaps

    def _on_errors(self, errors: list[ConfigIssue]) -> None:
        self.errors = list(errors)
        if self.election is not None:
            self._status_dirty.set()
        self.config_valid.set(0)
        self.config_errors.inc()
        for e in errors:
            log.error("config error; the last good config stays in force", extra={"error": str(e)})

    def _token_reviewer(self, security: Security, kubernetes: KubeSettings | None) -> TokenReviewer | None:
        """Agents' service-account tokens checked by the cluster (``--token-review``)."""
        if security.token_review is None:
            return None
        if kubernetes is None:
            raise ControlPlaneError("--token-review needs --source kubernetes (the API server reviews the tokens)")

        async def review(body: dict) -> dict:
            api = await self.source._client()
            return await api.call_api(REVIEW_PATH, "POST", body=body, auth_settings=["BearerToken"],
                                      response_types_map={201: "object", 200: "object"},
                                      _return_http_data_only=True, _request_timeout=10)
        return TokenReviewer(review, security.token_review)

    def _init_etcd(self, etcd: Etcd) -> None:
        self.etcd_client = EtcdClient(etcd.endpoints, tls=etcd.tls)
        self.source = EtcdSource(self.etcd_client, on_change=self._on_model, on_error=self._on_errors,
                                 prefix=etcd.prefix, on_state=self._etcd_state)
        replica = etcd.replica or f"{socket.gethostname()}-{os.getpid()}"
        self.election = LeaderElection(EtcdClient(etcd.endpoints, tls=etcd.tls), replica, prefix=etcd.prefix,
                                       ttl=etcd.lease_ttl, on_change=self._leadership)
        self.health.replica = replica
        self.health_sync = HealthSync(EtcdClient(etcd.endpoints, tls=etcd.tls), self.health, self.health_metrics,
                                      prefix=etcd.prefix, ttl=etcd.lease_ttl, on_change=self._on_shared_health)
        self.status_written: str | None = None
        self._status_dirty = asyncio.Event()
        self.etcd_connected = Gauge("hostmesh_controlplane_etcd_connected",
                                    "1 while the etcd source is listed and watching", registry=self.registry)
        self.etcd_skipped = Gauge("hostmesh_controlplane_etcd_skipped_keys",
                                  "Keys under the config prefix skipped as corrupt", registry=self.registry)
        self.etcd_relists = Gauge("hostmesh_controlplane_etcd_lists",
                                  "Full lists of the config prefix (start, compaction, reconnect)",
                                  registry=self.registry)
        self.leader_gauge = Gauge("hostmesh_controlplane_leader", "1 while this replica is the elected leader",
                                  registry=self.registry)
        self.leader_changes = Counter("hostmesh_controlplane_leader_changes",
                                      "Times this replica gained or lost leadership", registry=self.registry)

    def _etcd_state(self) -> None:
        self.etcd_connected.set(1 if self.source.connected else 0)
        self.etcd_skipped.set(len(self.source.state.corrupt))
        self.etcd_relists.set(self.source.relists)
        self._status_dirty.set()

    def _leadership(self, leading: bool) -> None:
        self.leader_gauge.set(1 if leading else 0)
        self.leader_changes.inc()
        self.status_written = None
        self._status_dirty.set()

    def status_record(self) -> dict:
        """What the leader writes to <prefix>status/config."""
        return {"leader": self.election.identity if self.election else None,
                "model_version": self.model.version if self.model else None,
                "valid": not self.errors, "objects": self.model.counts() if self.model else {},
                "errors": [str(e) for e in self.errors],
                "skipped": self.source.describe().get("skipped", [])}

    async def _write_status(self) -> None:
        """The leader's one job: keep the config status record in etcd current (fenced)."""
        key = f"{self.etcd.prefix.rstrip('/')}/status/config"
        while True:
            await self._status_dirty.wait()
            self._status_dirty.clear()
            if not self.election.leading:
                continue
            body = json.dumps(self.status_record(), sort_keys=True)
            if body == self.status_written:
                continue
            try:
                if await self.election.fenced_txn([put_op(key, body.encode())]):
                    self.status_written = body
            except EtcdError as exc:
                log.warning("could not write the config status to etcd", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
                self._status_dirty.set()

    def _new_node(self, node: str) -> NodeSnapshot | None:
        return (build_snapshot(self.model, node, self.health.config_objects(self.model))
                if self.model is not None else None)

    def _on_health(self, node: str, unhealthy: list[tuple[str, int, str]], stream: int = 0) -> None:
        """An agent's HealthReport: a changed set is pushed to every agent at once, and (etcd)
        written for the other replicas, even unchanged: the key becomes this replica's."""
        changed = self.health.report(node, unhealthy, self.model, stream=stream)
        if self.health_sync is not None:
            self.health_sync.mark(node)
        if changed:
            log.info("endpoint health changed", extra={
                "node": node, "unhealthy": sorted(f"{s} {a}:{p}" for a, p, s in self.health.unhealthy(node))})
            self._publish_health()

    def _on_stream_end(self, node: str, stream: int) -> None:
        """An agent's discovery stream closed: its report's grace starts (controlplane/health.py)."""
        if self.health.stream_ended(node, stream):
            self._publish_health()

    def _on_shared_health(self) -> None:
        """Another replica's report changed in etcd (healthsync.py)."""
        self._publish_health()

    def _publish_health(self) -> None:
        if self.model is not None:
            self._publish(self.model)

    async def _expire_health(self) -> None:
        """Reports whose agent stream ended longer than the grace ago are dropped (and deleted from etcd)."""
        tick = min(1.0, max(0.05, self.health.disconnect_grace / 4))
        while True:
            await asyncio.sleep(tick)
            before = self.health.version
            gone = self.health.expire()
            if not gone:
                continue
            self.health_metrics.expired.inc(len(gone))
            log.info("endpoint health reports expired: their agents disconnected", extra={
                "nodes": gone, "grace": self.health.disconnect_grace})
            if self.health_sync is not None:
                for node in gone:
                    self.health_sync.mark(node)
            if self.health.version != before:
                self._publish_health()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        await self.source.initial_load()
        if self.health_sync is not None and self.source.connected:   # etcd down: its run() retries
            await self.health_sync.initial_load()
        await self.grpc.start(self.grpc_address)
        try:
            await self.http.start()
        except BaseException:
            await self.grpc.stop(0)
            raise
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        watchers = [asyncio.create_task(self.source.run()), asyncio.create_task(self._expire_health())]
        if self.health_sync is not None:
            watchers.append(asyncio.create_task(self.health_sync.run()))
        if self.security is not None:
            watchers.append(asyncio.create_task(self._watch_security()))
        if self.election is not None:
            watchers += [asyncio.create_task(self.election.run()), asyncio.create_task(self._write_status())]
        log.info("control plane started", extra={"source": self.source.describe(), "grpc": self.grpc_address,
                                                  "http": self.http.address, "valid": not self.errors,
                                                  "tls": self.security is not None})
        await self._stop.wait()
        for w in watchers:
            w.cancel()
        if self.election is not None:
            await self.election.resign()
        await self.grpc.stop(2.0)
        await self.http.close()
        if self.health_sync is not None:   # its lease is not revoked: the entries lapse after the TTL
            await self.health_sync.close()
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
            "/debug/health": Route("GET", self._health_view,
                                   "endpoints the agents' health checks report unhealthy, by node "
                                   "(?detail=1: where each report came from)"),
        }, name="control plane http")

    def _health_view(self, query: str):
        if (parse_qs(query).get("detail") or ["0"])[0] in ("", "0", "false"):
            return json_response(200, self.health.describe())
        return json_response(200, {"grace": self.health.disconnect_grace, "nodes": self.health.describe_sources(),
                                   "etcd": self.health_sync.describe() if self.health_sync else None})

    def _ready(self, query: str):
        if self.model is None:
            errors = self.errors or self.source.errors   # the source's own: e.g. etcd unreachable at start
            reason = "no valid config loaded" + (f": {errors[0]}" if errors else "")
            return text_response(503, reason)
        return text_response(200, "ready")

    def config_view(self) -> dict:
        return {
            "version": __version__, "config_dir": self.config_dir, "valid": not self.errors,
            "source": self.source.describe(),
            "election": self.election.describe() if self.election else None,
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


def run_controlplane(config_dir: str | None, grpc_address: str, http_address: tuple[str, int], log_level: str,
                     security: Security | None = None, etcd: Etcd | None = None,
                     kubernetes: KubeSettings | None = None) -> int:
    import uvloop

    from nodeagent import logs
    logs.setup(log_level)
    cp = ControlPlane(config_dir, grpc_address=grpc_address, http_host=http_address[0], http_port=http_address[1],
                      security=security, etcd=etcd, kubernetes=kubernetes)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(cp.run())
