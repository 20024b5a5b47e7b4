"""The node agent's lifecycle: start the proxy, admin endpoint and capture, keep capture
reconciled, and on SIGTERM drain and stop, leaving capture installed.

Start order is chosen so that a failure leaves nothing behind: config is validated first,
the state directory's lock is taken (one agent per node), listeners bind (a port in use
stops us before any rule exists), then capture is installed, or adopted from the previous
agent. A stop (SIGTERM, SIGINT, POST /quitquitquit) stops accepting and drains, and leaves
capture in place: until the next agent starts, captured connections are refused (fail
closed), never sent around the proxy. Only ``uninstall`` (``hostmesh agent --uninstall``)
removes capture, and it refuses while an agent holds the lock. Under systemd the agent is a
``Type=notify`` service (``nodeagent/service.py``: READY once ready, STATUS, STOPPING, the
watchdog from the event loop); a stop there keeps capture the same way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from hostmesh import __version__
from nodeagent import logs
from nodeagent.admin import HEALTH_PATHS, AdminDispatcher, AdminInputs, AdminServer
from nodeagent.bootstrap import Bootstrap
from nodeagent.capture import Capture, CaptureSpec, make_capture, remove_other_backends
from nodeagent.capture.base import so_original_dst
from nodeagent.configsource import SnapshotFile
from nodeagent.cpclient import ControlPlaneClient
from nodeagent.healthcheck import HealthChecker
from nodeagent.endpoints import EndpointRotation
from nodeagent.persist import SnapshotStore
from nodeagent.errors import AgentError
from nodeagent.identity.cpauth import ControlPlaneAuth, GrpcSigner
from nodeagent.identity.manager import CertificateManager
from nodeagent import handoff as ho
from nodeagent import lineage
from nodeagent.lineage import Lineage
from nodeagent.instance_lock import AgentRunning, InstanceLock
from nodeagent.proxy import NodeProxy, ProxyInputs, ProxyLimits
from nodeagent.proxy.jwks import HttpsJwksFetcher, JwksCache, JwksRefresher
from nodeagent.proxy.jwtauth import RequestAuthn
from nodeagent.proxy.l7.metrics import HttpMetrics
from nodeagent.proxy.l7.resilience import NOT_EJECTED, merge_state_views
from nodeagent.state import unhealthy_endpoints
from nodeagent.proxy.destinations import service_endpoints
from nodeagent.state import AgentState, NodeSnapshot
from nodeagent.telemetry import MetricsRegistry, LoopLag, ProxyMetrics
from nodeagent.accesslog import AccessLog
from nodeagent import reload, sdnotify
from nodeagent.service import ServiceReporter, status_line
from nodeagent.worker import bootstrap_to
from nodeagent.workers import WorkerPool

log = logging.getLogger("hostmesh.agent")

RECONCILE_INTERVAL = 10.0


class AgentMetrics:
    """hostmesh_agent_* internals, on the agent's registry."""

    def __init__(self, registry: CollectorRegistry, *, lag_registry: CollectorRegistry | None = None) -> None:
        self.ready = Gauge("hostmesh_agent_ready", "1 when the agent is ready to serve mesh traffic",
                           registry=registry)
        self.info = Info("hostmesh_agent", "Agent build and node", registry=registry)
        self.snapshot_version = Info("hostmesh_agent_snapshot", "Version of the snapshot in force",
                                     registry=registry)
        self.config_errors = Counter("hostmesh_agent_config_errors_total",
                                     "Snapshots rejected as invalid (the last good one stays)", registry=registry)
        self.capture_repairs = Counter("hostmesh_agent_capture_repairs_total",
                                       "Times reconcile found capture drifted and reinstalled it", registry=registry)
        self.capture_verify_ok = Gauge("hostmesh_agent_capture_verified",
                                       "1 when the last capture verification matched the desired state",
                                       registry=registry)
        self.generation = Gauge("hostmesh_agent_generation",
                                "Agents started on this state directory so far, this one included",
                                registry=registry)
        self.restarts = Counter("hostmesh_agent_restarts_total",
                                "Agent starts on this state directory after the first (stop, crash or hand-off); "
                                "continues across processes", registry=registry)
        self.handoffs = Counter("hostmesh_agent_handoffs_total",
                                "Listener hand-offs to a new agent on this state directory; continues across "
                                "processes", registry=registry)
        self.handoff_failures = Counter("hostmesh_agent_handoff_failures_total",
                                        "Hand-offs this agent did not complete, by reason (refused: an incompatible "
                                        "new agent; aborted: it gave up or died); this agent kept serving",
                                        ["reason"], registry=registry)
        self.capture_adopted = Gauge("hostmesh_agent_capture_adopted",
                                     "1 when this agent found its capture already installed at start "
                                     "(left by a previous agent's stop or crash) and adopted it",
                                     registry=registry)
        self.capture_installed = Gauge("hostmesh_agent_capture_installed",
                                       "1 while this agent's traffic capture is installed", registry=registry)
        self.snapshot_applied = Gauge("hostmesh_agent_snapshot_applied_timestamp_seconds",
                                      "When the snapshot in force was applied (Unix time)", registry=registry)
        self.config_stale_seconds = Gauge("hostmesh_agent_config_stale_seconds",
                                          "Seconds the config has been stale: not confirmed by a connected "
                                          "control plane (0 while connected, and with a snapshot file)",
                                          registry=registry)
        # with worker processes the agent's own lag is merged with theirs (the worst loop
        # of the node, worker_wire.MAX_MERGED), so it lives on a registry of its own
        self.lag_registry = lag_registry
        self.loop_lag = LoopLag(lag_registry if lag_registry is not None else registry)

    def snapshot_in_force(self, snapshot: NodeSnapshot) -> None:
        """An AgentState subscriber: the config version and when it came (either config source)."""
        self.snapshot_version.info({"version": snapshot.version})
        self.snapshot_applied.set(time.time())


@dataclass
class Lifecycle:
    # STARTING -> LIVE -> DRAINING -> STOPPED; a hand-off: LIVE -> HANDED_OFF -> DRAINING -> STOPPED
    state: str = "STARTING"
    started: float = field(default_factory=time.time)
    capture_installed: bool = False
    capture_adopted: bool = False  # found installed at start (a previous agent's stop or crash)
    last_verify: dict | None = None
    lineage: Lineage = field(default_factory=Lineage)
    predecessor: ho.Predecessor | None = None  # the agent this one took the listeners from
    successor_pid: int | None = None  # the agent this one handed them to


class Agent:
    def __init__(self, boot: Bootstrap) -> None:
        self.boot = boot
        self.registry = MetricsRegistry()
        self.metrics = AgentMetrics(self.registry, lag_registry=CollectorRegistry() if boot.workers > 1 else None)
        self.metrics.info.info({"version": __version__, "node": boot.node, "capture": boot.capture_mode})
        self.state = AgentState()
        self.state.subscribe(self.metrics.snapshot_in_force)
        self.life = Lifecycle()
        self.metrics.capture_installed.set_function(lambda: 1 if self.life.capture_installed else 0)
        self.metrics.config_stale_seconds.set_function(self._config_stale_seconds)
        self.lock = InstanceLock(boot.state_dir)
        self.capture: Capture | None = capture_for(boot)
        if self.capture is not None:
            self.capture.register_metrics(self.registry)
        # config comes from the control plane; a static snapshot file is kept for tests/benches
        self.source = SnapshotFile(boot.snapshot_file, boot.node, self.state,
                                   on_error=lambda _msg: self.metrics.config_errors.inc()) \
            if boot.snapshot_file else None
        use_cp = bool(boot.control_plane and not boot.snapshot_file)
        # workload certificates come from the control plane's CA, over TLS with the node token;
        # an insecure (test) control plane issues none
        self.auth: ControlPlaneAuth | None = None
        self.certs: CertificateManager | None = None
        self.signer: GrpcSigner | None = None
        endpoints = EndpointRotation(boot.control_plane) if use_cp else None
        if use_cp and not boot.cp_insecure:
            self.auth = ControlPlaneAuth.from_files(boot.node, boot.cp_token_file, boot.cp_root_bundle,
                                                    boot.cp_server_name)
            self.signer = GrpcSigner(endpoints, self.auth, extra_roots=self._ca_bundle)
            self.certs = CertificateManager(boot.node, self.signer, boot.cert_dir, self.registry)
        self.cp = ControlPlaneClient(
            endpoints, boot.node, self.state,
            SnapshotStore(os.path.join(boot.state_dir, "snapshot.json")), self.registry,
            validate=self.validate_snapshot, auth=self.auth, extra_roots=self._ca_bundle,
        ) if use_cp else None
        # active health checks of this node's endpoints, reported to the control plane
        self.health_checks = HealthChecker(boot.node, lambda: self.state.snapshot, self.cp.report_health,
                                           mark=boot.socket_mark if self.capture else 0,
                                           registry=self.registry) if self.cp else None
        # keys of RequestAuthentication jwksUri rules: fetched here, read by the proxies
        self.jwks = JwksCache()
        self.jwks_refresher = JwksRefresher(self.jwks, HttpsJwksFetcher(jwks_ssl_context(boot)), self.registry,
                                            refresh_interval=boot.jwks_refresh_interval)
        self._jwks_rules = RequestAuthn(self.jwks.keys)
        # with worker processes this proxy only answers the admin views (routes, policies);
        # its metrics go to a registry nobody reads, the workers' are merged into ours
        self.proxy = NodeProxy(
            proxy_inputs(boot, self.state, self.registry if boot.workers == 1 else CollectorRegistry(),
                         identities=self.certs, jwks_keys=self.jwks.keys,
                         original_destination=self.capture.original_destination if self.capture else so_original_dst,
                         capturing=self.capture is not None),
            outbound_port=boot.outbound_port, inbound_port=boot.inbound_port,
        )
        self.pool: WorkerPool | None = None
        if boot.workers > 1:
            self.pool = WorkerPool(count=boot.workers, bootstrap=bootstrap_to(boot), log_level=boot.log_level,
                                   state=self.state, certs=self.certs, jwks=self.jwks, registry=self.registry,
                                   local=self.metrics.lag_registry)
        # what serves the node's traffic: the workers, or the proxy in this process
        self.serving = self.pool if self.pool is not None else self.proxy
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.build = lineage.build_id()
        self.handoff: ho.HandoffServer | None = None
        self.admin = AdminServer(self._admin_inputs(), host=boot.admin_host, port=boot.admin_port)
        # probes and Prometheus from off the node, without the admin endpoint's views and POSTs
        self.health = AdminServer(None, host=boot.health_host, port=boot.health_port, name="health endpoint",
                                  dispatcher=AdminDispatcher(self.admin.inputs, only=HEALTH_PATHS)) \
            if boot.health_port else None
        # the manager's variables, for a successor started by a reload (they are unset below)
        self._notify_env = {k: os.environ[k] for k in (sdnotify.ENV_SOCKET, sdnotify.ENV_WATCHDOG_USEC)
                            if k in os.environ}
        self._reload_child: subprocess.Popen | None = None
        self._reloading: asyncio.Task | None = None
        # READY/STATUS/STOPPING and the watchdog for systemd (Type=notify); a no-op without it
        self.service = ServiceReporter.from_environ(self._service_status)
        # listening sockets systemd kept for us (FDSTORE) across a restart or a crash
        self._stored_fds = sdnotify.take_listen_fds()
        self._stored_names: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        successor: ho.HandoffClient | None = None
        try:
            self.lock.acquire(f"agent for node {self.boot.node}")
        except AgentRunning:
            if not (self.boot.handoff_enabled and ho.HandoffClient.available(self.boot.state_dir)):
                raise
            successor = ho.HandoffClient(self.boot.state_dir)
        try:
            return await self._run(successor)
        finally:
            if self.handoff is not None:
                self.handoff.close()
            self.lock.release()

    async def _run(self, successor: ho.HandoffClient | None) -> int:
        self.service.start()  # the watchdog is petted from this loop: a wedged loop gets restarted
        if self.source:
            self.source.poll()
            if self.source.last_error and self.state.snapshot is None:
                raise AgentError(self.source.last_error)
        # config and certificates first: a successor must be able to serve before it takes over
        self._start_config_loops()
        try:
            self.service.phase("starting: taking the running agent's listeners over once config is ready"
                               if successor is not None else "starting: opening listeners")
            await self._start_serving(successor)
            self.service.phase(f"starting: installing {self.boot.capture_mode} capture" if self.capture
                               else "starting (capture is off)")
            await self._install_capture()
        except BaseException:
            if successor is not None:
                successor.abort("the new agent failed to start")
            self._cancel_tasks()
            self.serving.close()
            await self.admin.close()
            if self.health is not None:
                await self.health.close()
            raise
        self.life.state = "LIVE"
        self._update_ready()
        self.service.running()  # READY=1 once /ready says ready, then STATUS as things change
        log.info("agent started", extra={"node": self.boot.node, "capture": self.boot.capture_mode,
                                          "admin": f"{self.boot.admin_host}:{self.admin.bound_port}",
                                          "generation": self.life.lineage.generation})
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        if self.capture:
            self._tasks.append(asyncio.create_task(self._reconcile_capture()))
        self._tasks.append(asyncio.create_task(self.metrics.loop_lag.run()))
        self.state.subscribe(self._watch_jwks)
        if self.state.snapshot is not None:
            self._watch_jwks(self.state.snapshot)
        if self.health_checks is not None:
            self.state.subscribe(self.health_checks.refresh)
            self.health_checks.start()
        self._serve_handoffs(loop)
        await self._stop.wait()
        await self.shutdown()
        return 0

    def _start_config_loops(self) -> None:
        if self.source:
            self._tasks.append(asyncio.create_task(self._watch_config()))
        if self.cp:
            self._tasks.append(asyncio.create_task(self.cp.run()))
        if self.certs:
            self._tasks.append(asyncio.create_task(self.certs.run(self.state)))

    def _cancel_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks.clear()

    async def _start_serving(self, successor: ho.HandoffClient | None) -> None:
        """Listen: on fresh sockets, or on the running agent's (a hand-off). Either way this
        process holds the state directory's lock afterwards."""
        inherited: dict = {}
        if successor is not None:
            inherited = await self._take_over(successor)
        elif self._stored_fds:
            inherited = self._adopt_stored()
        admin, health = inherited.pop("admin", None), inherited.pop("health", None)
        await self.serving.start(ho.grouped(inherited))
        await self.admin.start(admin)
        if self.health is not None:
            await self.health.start(health)
        elif health is not None:
            health.close()
        self._store_listeners()
        previous = lineage.load(self.boot.state_dir)
        if successor is not None:
            await asyncio.to_thread(successor.serving)
            await self._acquire_lock_after_handoff()
            pred = self.life.predecessor
            self.life.lineage = previous.successor(predecessor=Lineage(pred.generation, pred.counters.get("handoffs", 0)))
            log.info("took over from the previous agent", extra={"predecessor_pid": pred.pid,
                                                                 "predecessor_build": pred.build})
        else:
            self.life.lineage = previous.successor()
        try:
            lineage.save(self.boot.state_dir, self.life.lineage)
        except OSError as exc:
            log.warning("cannot record the agent generation", extra={"error": exc.strerror or str(exc)})
        self.metrics.generation.set(self.life.lineage.generation)
        self.metrics.restarts.inc(self.life.lineage.restarts)
        self.metrics.handoffs.inc(self.life.lineage.handoffs)

    def _adopt_stored(self) -> dict[str, socket.socket]:
        """The service manager's stored sockets that still fit the bootstrap: a listening TCP
        socket on the configured address. One that does not (the bootstrap changed) is closed
        and its listener bound afresh."""
        want = self._listener_addresses()
        out = {}
        for name, fd in self._stored_fds.items():
            sock = socket.socket(fileno=fd)
            why = ho.stored_socket_mismatch(sock, want.get(name.partition("#")[0]))
            if why:
                log.warning("a stored socket does not fit this bootstrap; binding afresh",
                            extra={"name": name, "reason": why})
                sock.close()
                continue
            out[name] = sock
        if out:
            log.info("listening on the sockets the service manager kept (no connection was refused meanwhile)",
                     extra={"sockets": sorted(out)})
        self._stored_names = set(self._stored_fds)
        self._stored_fds = {}
        return out

    def _store_listeners(self) -> None:
        """Give the service manager our listening sockets (FDSTORE): across a restart, a crash
        or a watchdog kill the kernel keeps queueing connections on them, and the next agent
        accepts them, so a restart under systemd refuses nothing either."""
        if not self.service.notifier.enabled:
            return
        fds = ho.fds_of(self._own_sockets())
        for gone in sorted(self._stored_names - set(fds)):
            self.service.notifier.remove_fds(gone)
        for name, fd in fds.items():
            self.service.notifier.store_fds(name, [fd])

    async def _take_over(self, successor: ho.HandoffClient) -> dict:
        """HELLO, ready our config, TAKE: the running agent's listening sockets by name."""
        self.life.predecessor = await asyncio.to_thread(successor.connect, self._hello())
        log.info("an agent is running on this state directory: taking its listeners over once ready",
                 extra={"predecessor_pid": self.life.predecessor.pid, "timeout": self.boot.handoff_timeout})
        try:
            await self._wait_ready_to_serve(self.boot.handoff_timeout)
        except AgentError as exc:
            successor.abort(str(exc))
            raise
        return await asyncio.to_thread(successor.take)

    async def _wait_ready_to_serve(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            why = self._not_ready_to_serve()
            if not why:
                return
            if time.monotonic() >= deadline:
                raise AgentError(f"not ready to take over within {timeout:g}s ({why}); the running agent keeps "
                                 "serving")
            await asyncio.sleep(0.05)

    def _not_ready_to_serve(self) -> str:
        """'' once this agent could serve its node: a snapshot and valid certificates."""
        if self.state.snapshot is None:
            if self.cp:
                return self.cp.status()["message"]
            return self.source.last_error if self.source and self.source.last_error else "no config yet"
        if self.certs:
            ok, why = self.certs.readiness()
            if not ok:
                return why
        return ""

    async def _acquire_lock_after_handoff(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.lock.acquire(f"agent for node {self.boot.node}")
                return
            except AgentRunning:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.02)

    def _hello(self) -> ho.Hello:
        return ho.Hello(node=self.boot.node, build=self.build, pid=os.getpid(),
                        listeners=self._listener_addresses(), capture=self._capture_identity())

    def _listener_addresses(self) -> dict[str, str]:
        b = self.boot
        return {**self.proxy.listener_addresses(), "admin": f"{b.admin_host}:{b.admin_port}",
                **({"health": f"{b.health_host}:{b.health_port}"} if b.health_port else {})}

    def _own_sockets(self) -> dict:
        """Every listening socket this agent hands over or stores, by wire name."""
        return {**self.serving.listening_sockets(), "admin": self.admin.listening_socket,
                **({"health": self.health.listening_socket} if self.health is not None else {})}

    def _capture_identity(self) -> dict[str, str]:
        return {"mode": self.boot.capture_mode, "instance": self.boot.capture_instance}

    async def _install_capture(self) -> None:
        if not self.capture:
            return
        # what a previous agent left (a stop keeps capture): adopted by install's reconcile
        self.life.capture_adopted = (await asyncio.to_thread(self.capture.verify)).ok
        self.metrics.capture_adopted.set(1 if self.life.capture_adopted else 0)
        await asyncio.to_thread(self.capture.install)
        self.life.capture_installed = True
        # capture.mode changed since the last agent: its backend goes once ours is in place
        removed = await asyncio.to_thread(remove_other_backends, self.capture)
        if removed:
            log.warning("removed the capture another backend left (capture.mode changed)",
                        extra={"removed": removed, "capture": self.boot.capture_mode})
        self.life.last_verify = (await asyncio.to_thread(self.capture.verify)).to_dict()
        self.metrics.capture_verify_ok.set(1)
        if self.pool is not None and not self._workers_find_destinations():
            raise AgentError("workers: proxy worker processes read original destinations with SO_ORIGINAL_DST, "
                             "which this eBPF capture cannot answer (cgroup/getsockopt is not attached); "
                             "set workers: 1 or use capture.mode: iptables")

    def _workers_find_destinations(self) -> bool:
        """eBPF without cgroup/getsockopt answers original destinations from a map only the
        agent process reads; workers cannot."""
        d = self.capture.describe()
        return d.get("backend") != "ebpf" or "getsockopt" in str(d.get("original_destination", ""))

    # ------------------------------------------------------------------ being the predecessor
    def _serve_handoffs(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.boot.handoff_enabled:
            return
        hooks = ho.HandoffHooks(
            offer=self._offer,
            listener_fds=lambda: ho.fds_of(self._own_sockets()),
            release=lambda hello: asyncio.run_coroutine_threadsafe(self._hand_off(hello), loop).result(30),
            outcome=lambda result, why: loop.call_soon_threadsafe(self._handoff_outcome, result),
        )
        self.handoff = ho.HandoffServer(self.boot.state_dir, hooks,
                                        take_timeout=self.boot.handoff_timeout + 30.0)
        try:
            self.handoff.start()
        except ho.HandoffError as exc:
            log.error("hand-offs are off for this agent", extra={"error": str(exc)})
            self.handoff = None

    def _offer(self) -> ho.Offer:
        lin = self.life.lineage
        return ho.Offer(node=self.boot.node, build=self.build, pid=os.getpid(), generation=lin.generation,
                        listeners=self._listener_addresses(), capture=self._capture_identity(),
                        counters={"handoffs": lin.handoffs})

    def _handoff_outcome(self, result: str) -> None:
        if result in ("refused", "aborted"):
            self.metrics.handoff_failures.labels(result).inc()

    def _reload(self) -> None:
        """SIGHUP (``systemctl reload``): hand over to a new agent inside the unit (reload.py)."""
        if self._reloading is not None:
            log.warning("a reload is already in progress")
            return
        if self.life.state != "LIVE" or self.handoff is None:
            log.warning("reload ignored: only a serving agent with hand-offs enabled can hand over",
                        extra={"state": self.life.state})
            return
        self._reloading = asyncio.create_task(self._run_reload())

    async def _run_reload(self) -> None:
        self.service.reloading("reloading: a new agent is taking the listeners over")
        log.info("reload: starting a new agent to take over", extra={"argv": reload.successor_argv()})
        why = ""
        try:
            child = self._reload_child = reload.spawn_successor(self._notify_env)
        except OSError as exc:
            why = f"cannot start the new agent: {exc.strerror or exc}"
        deadline = time.monotonic() + self.boot.handoff_timeout + 30.0
        while not why and self.life.state == "LIVE":
            if child.poll() is not None:
                why = f"the new agent exited with {child.returncode} before taking over (see its log)"
            elif time.monotonic() > deadline:
                child.kill()
                why = "the new agent did not take over in time"
            else:
                await asyncio.sleep(0.1)
        self._reloading = None
        if why:
            self._reload_child = None
            self.metrics.handoff_failures.labels("reload").inc()
            log.error("reload failed; this agent keeps serving", extra={"error": why})
            self.service.reload_failed(f"reload failed: {why}; the running agent keeps serving")

    async def _hand_off(self, hello: ho.Hello) -> None:
        """The successor accepts on our listeners: stop accepting, stop every loop that
        writes shared state (config, certificates, capture), release the lock, then drain."""
        if self.life.state in ("HANDED_OFF", "DRAINING", "STOPPED"):
            return
        if self._reload_child is not None and hello.pid == self._reload_child.pid:
            # before the successor can take the lock and send READY: the unit follows it now
            self.service.notifier.send(MAINPID=hello.pid)
        self.life.state = "HANDED_OFF"
        self.life.successor_pid = hello.pid
        self._update_ready()
        self.serving.stop_accepting()
        self.admin.stop_accepting()
        if self.health is not None:
            self.health.stop_accepting()
        self._cancel_tasks()
        self.lock.release()
        self._stop.set()

    async def shutdown(self) -> None:
        handed_off = self.life.state == "HANDED_OFF"
        log.info("handed off: draining" if handed_off else "shutting down: draining",
                 extra={"grace": self.boot.drain_grace, "active": self.serving.active_connections,
                        "successor_pid": self.life.successor_pid})
        if self.handoff is not None:
            self.handoff.close()
        self.life.state = "DRAINING"
        self._update_ready()
        self.service.stopping(f"handed off to the agent with pid {self.life.successor_pid}: draining" if handed_off
                              else f"stopping: draining {self.serving.active_connections} connections "
                                   f"(up to {self.boot.drain_grace:g}s); capture stays installed")
        self._cancel_tasks()
        if self.health_checks is not None:
            await self.health_checks.stop()
        await self.jwks_refresher.close()
        aborted = await self.serving.drain(self.boot.drain_grace)
        if self.signer:
            await self.signer.close()
        await self.admin.close()
        if self.health is not None:
            await self.health.close()
        self.life.state = "STOPPED"
        self.service.close("handed off: the new agent serves this node" if handed_off
                           else "stopped; capture stays installed (fail closed)" if self.capture else "stopped")
        log.info("agent stopped", extra={"aborted_connections": aborted})
        if handed_off:
            log.info("the new agent serves this node and owns capture", extra={"successor_pid": self.life.successor_pid})
        elif self.capture:
            log.info("capture stays installed: captured connections "
                     + ("wait in the listening sockets the service manager keeps (FDSTORE), or are refused "
                        "where it keeps none" if self.service.notifier.enabled
                        else "are refused until the next agent starts (fail closed)")
                     + "; remove it with `hostmesh agent --uninstall`", extra={"capture": self.boot.capture_mode})

    def _watch_jwks(self, snapshot: NodeSnapshot) -> None:
        """Keep the keys of exactly the snapshot's jwksUri rules fresh."""
        if self.life.state == "LIVE":
            self.jwks_refresher.watch(self._jwks_rules.jwks_uris(snapshot))

    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(self.source.interval)
            self.source.poll()  # a new snapshot reaches the metrics through AgentState.subscribe
            self._update_ready()

    async def _reconcile_capture(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            try:
                status = await asyncio.to_thread(self.capture.verify)
                if not status.ok:
                    log.warning("capture drifted; reinstalling", extra={"problems": status.problems})
                    self.metrics.capture_repairs.inc()
                    await asyncio.to_thread(self.capture.install)
                    status = await asyncio.to_thread(self.capture.verify)
                self.life.last_verify = status.to_dict()
                self.metrics.capture_verify_ok.set(1 if status.ok else 0)
            except AgentError as exc:
                log.error("capture reconcile failed", extra={"error": str(exc)})
                self.metrics.capture_verify_ok.set(0)
            self._update_ready()

    def validate_snapshot(self, snap: NodeSnapshot) -> None:
        """What only this node can check (the control plane does not know its pod CIDRs):
        a local workload outside them would never be captured, so the snapshot is NACKed."""
        if self.capture is None:
            return
        nets = [ipaddress.IPv4Network(c) for c in self.boot.pod_cidrs]
        for w in snap.local_workloads():
            if not any(ipaddress.IPv4Address(w.address) in n for n in nets):
                raise ValueError(f"workload {w.namespace}/{w.name}: address {w.address} is outside this node's "
                                 f"pod CIDRs {', '.join(self.boot.pod_cidrs)}, so its traffic would not be captured")

    # ------------------------------------------------------------------ admin views
    def _config_stale_seconds(self) -> float:
        """hostmesh_agent_config_stale_seconds: since when the control-plane client says stale."""
        if self.cp is None:
            return 0.0
        since = self.cp.status().get("stale_since")
        return max(0.0, time.time() - datetime.fromisoformat(since).timestamp()) if since else 0.0

    def readiness(self) -> tuple[bool, str]:
        if self.life.state != "LIVE":
            return False, f"agent is {self.life.state.lower()}"
        if self.state.snapshot is None:
            if self.cp:
                return False, self.cp.status()["message"]
            why = self.source.last_error if self.source and self.source.last_error else "no config received yet"
            return False, why
        if self.capture and not self.life.capture_installed:
            return False, "capture is not installed"
        if self.capture and self.life.last_verify and not self.life.last_verify.get("ok"):
            return False, "capture verification failed: " + "; ".join(self.life.last_verify.get("problems", []))
        if self.certs:
            certs_ok, why = self.certs.readiness()
            if not certs_ok:
                return False, why
        if self.cp:
            cp = self.cp.status()
            if cp["stale"]:
                return True, f"ready; {cp['message']}"
        return True, "ready"

    def _update_ready(self) -> None:
        self.metrics.ready.set(1 if self.readiness()[0] else 0)

    def _service_status(self) -> tuple[bool, str]:
        """(ready, STATUS line) for the service manager: the same readiness as /ready."""
        ready, why = self.readiness()
        snap = self.state.snapshot
        return ready, status_line(
            self.life.state, ready, why, services=len(snap.services) if snap else None,
            workloads=len(snap.local_workloads()) if snap else None, version=snap.version if snap else None,
            config_from="the control plane" if self.cp else "the snapshot file",
            successor_pid=self.life.successor_pid)

    def _admin_inputs(self) -> AdminInputs:
        return AdminInputs(
            registry=self.registry,
            server_info=self.server_info,
            readiness=self.readiness,
            config_dump=self.config_dump,
            listeners=self.listeners,
            clusters=self.clusters,
            routes=self.routes,
            certs=self.certs.status if self.certs else lambda: [],
            capture=self.capture_view,
            drain=self.drain_listeners,
            quit=self._stop.set,
            set_log_level=logs.set_level,
            policies=self.policies,
        )

    def _ca_bundle(self) -> str:
        """The newest trust bundle from the CA: trusted for the control plane's TLS as well."""
        return self.certs.trust_bundle_pem() if self.certs else ""

    def server_info(self) -> dict:
        snap = self.state.snapshot
        return {
            "version": __version__, "node": self.boot.node, "hostname": socket.gethostname(), "pid": os.getpid(),
            "state": self.life.state, "uptime_seconds": round(time.time() - self.life.started, 3),
            "capture_mode": self.boot.capture_mode, "capture_adopted": self.life.capture_adopted,
            "snapshot_version": snap.version if snap else None,
            "active_connections": self.serving.active_connections,
            "control_plane": self.cp.status()["message"] if self.cp else "static snapshot file",
            "build": self.build, "generation": self.life.lineage.generation,
            "restarts": self.life.lineage.restarts, "handoffs": self.life.lineage.handoffs,
            "predecessor": ({"pid": p.pid, "build": p.build, "generation": p.generation}
                            if (p := self.life.predecessor) else None),
            "successor_pid": self.life.successor_pid,
            "handoff_socket": self.handoff.path if self.handoff is not None else None,
            "workers": self.workers_view(),
        }

    def workers_view(self) -> dict:
        if self.pool is None:
            return {"count": 1, "mode": "in-process", "processes": [{"index": 0, "pid": os.getpid(),
                                                                     "state": "serving"}]}
        return {"count": self.pool.count, "mode": "processes", "processes": self.pool.stats()["workers"]}

    def config_dump(self) -> dict:
        snap = self.state.snapshot
        return {"bootstrap": self.boot.to_dict(), "snapshot": snap.to_dict() if snap else None,
                "snapshot_error": self.source.last_error if self.source else "",
                "control_plane": self.cp.status() if self.cp else None,
                "authorization": self.policies(), "jwks": self.jwks_view(),
                "health_checks": self.health_checks.describe() if self.health_checks is not None else [],
                **({"workers": self.pool.describe()} if self.pool is not None else {})}

    def policies(self) -> list[dict]:
        """The AuthorizationPolicies in force per local workload (what the inbound side applies)."""
        snap = self.state.snapshot
        if snap is None:
            return []
        out = self.proxy.inbound.authz.authorizer.summary(snap, snap.local_workloads())
        for entry, w in zip(out, snap.local_workloads()):
            entry["requestAuthentication"] = self._jwks_rules.policies(snap, w)
        return out

    def jwks_view(self) -> list[dict]:
        """The jwksUri key sets: how their fetches went (keys are public: their ids are shown)."""
        out = []
        for uri in self.jwks.uris():
            st = self.jwks.status(uri)
            out.append({"uri": uri, "keys": [k.kid or "(no kid)" for k in st.keys or ()],
                        "last_success": st.last_success, "last_attempt": st.last_attempt,
                        "last_error": st.last_error, "consecutive_failures": st.consecutive_failures})
        return out

    def listeners(self) -> list[dict]:
        counts = self.serving.connection_counts()
        return [
            {"name": "outbound", "address": f"0.0.0.0:{self.boot.outbound_port}",
             "active_connections": counts["outbound"]},
            {"name": "inbound", "address": f"0.0.0.0:{self.boot.inbound_port}",
             "active_connections": counts["inbound"]},
            *([{"name": "tunnel", "address": f"0.0.0.0:{self.proxy.tunnel.port}",
                "active_connections": counts["tunnel"]}]
              if self.proxy.tunnel is not None else []),
            {"name": "admin", "address": f"{self.boot.admin_host}:{self.admin.bound_port}"},
            *([{"name": "health", "address": f"{self.boot.health_host}:{self.health.bound_port}"}]
              if self.health is not None else []),
        ]

    def routes(self) -> list[dict]:
        """The HTTP routes in force per Service port (what the outbound L7 driver applies)."""
        l7 = self.proxy.outbound.l7
        return l7.routes_view(self.state.snapshot) if l7 is not None else []

    def clusters(self) -> list[dict]:
        """Per Service port: VIP, endpoints and, where a TrafficPolicy sets retries, outlier
        detection, rate limits (of requests or connections) or maxRequests, their live state
        (``resilience``; with worker processes each keeps its own: the metrics sum them)."""
        snap = self.state.snapshot
        if snap is None:
            return []
        views = self._resilience_views()
        failing = unhealthy_endpoints(snap.config)
        out = []
        for s in snap.services:
            for p in s.ports:
                v = views.get(f"{s.namespace}/{s.name}/{p.port}")
                eps = []
                for e in service_endpoints(s, p):
                    ep = {"address": f"{e.address}:{e.port}", "node": e.node, "workload": e.workload}
                    if v is not None and "outlier" in v["summary"]:
                        ep["outlier"] = v["endpoints"].get(ep["address"], NOT_EJECTED)
                    if failing:  # active health checks of the endpoint's own node
                        ep["healthCheck"] = "failing" if (e.address, e.port, f"{s.namespace}/{s.name}") in failing \
                            else "passing"
                    eps.append(ep)
                c = {"name": f"{s.hostname}:{p.port}", "service": s.hostname, "vip": f"{s.cluster_ip}:{p.port}",
                     "endpoints": eps}
                if v is not None:
                    c["resilience"] = v["summary"]
                out.append(c)
        return out

    def _resilience_views(self) -> dict[str, dict]:
        if self.pool is not None:
            return merge_state_views(self.pool.resilience())
        return self.proxy.outbound.resilience_view()

    def capture_view(self) -> dict:
        if not self.capture:
            return {"backend": "none", "installed": False}
        d = self.capture.describe()
        d["installed"] = self.life.capture_installed
        d["last_verification"] = self.life.last_verify
        return d

    async def drain_listeners(self) -> None:
        """POST /drain: stop accepting and finish what is in flight; the agent keeps running."""
        self.life.state = "DRAINING"
        self._update_ready()
        await self.serving.drain(self.boot.drain_grace)


def proxy_inputs(boot: Bootstrap, state: AgentState, registry: CollectorRegistry, *, identities, jwks_keys,
                 original_destination, capturing: bool) -> ProxyInputs:
    """The proxy's inputs from the bootstrap: the same for the in-process proxy and workers."""
    return ProxyInputs(
        state=state, node=boot.node, metrics=ProxyMetrics(registry),
        limits=ProxyLimits(connect_timeout=boot.connect_timeout, idle_timeout=boot.idle_timeout,
                           max_connections=boot.max_connections),
        socket_mark=boot.socket_mark if capturing else 0,
        unknown_destination=boot.unknown_destination,
        original_destination=original_destination,
        identities=identities,
        http_metrics=HttpMetrics(registry),
        jwks_keys=jwks_keys,
        rate_limit_share=1.0 / max(1, boot.workers),
        access_log=AccessLog(registry, state, node=boot.node),
    )


def jwks_ssl_context(boot: Bootstrap) -> ssl.SSLContext:
    """TLS for jwksUri fetches: the system's CAs, plus ``jwks.caFile`` when set."""
    context = ssl.create_default_context()
    if boot.jwks_ca_file:
        try:
            context.load_verify_locations(cafile=boot.jwks_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise AgentError(f"jwks.caFile: cannot load {boot.jwks_ca_file}: {exc}") from None
    return context


def capture_for(boot: Bootstrap) -> Capture | None:
    """The capture backend the bootstrap describes (None when capture is off)."""
    if boot.capture_mode == "none":
        return None
    return make_capture(boot.capture_mode, CaptureSpec(
        pod_cidrs=boot.pod_cidrs, mesh_cidrs=boot.mesh_cidrs, outbound_port=boot.outbound_port,
        inbound_port=boot.inbound_port, socket_mark=boot.socket_mark, cgroups=boot.capture_cgroups,
        redirect_address=boot.redirect_address, instance=boot.capture_instance,
        accelerate=boot.capture_accelerate))


def uninstall(boot: Bootstrap) -> str:
    """Remove the capture the bootstrap describes, idempotently; refuses (AgentRunning)
    while an agent for this state directory runs. Returns what was done, for the user."""
    lock = InstanceLock(boot.state_dir)
    lock.acquire(f"uninstall for node {boot.node}")
    try:
        capture = capture_for(boot)
        if capture is None:
            return f"node {boot.node}: capture is off in this bootstrap; nothing to remove"
        capture.remove()
        others = remove_other_backends(capture)  # whatever else an earlier capture.mode left
        return f"node {boot.node}: {boot.capture_mode} capture removed" + (
            f" (and leftovers of {', '.join(others)})" if others else "")
    finally:
        lock.release()


def raise_fd_limit() -> None:
    """Two sockets per proxied connection: lift the soft fd limit to the hard one, as Envoy advises."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_agent(boot: Bootstrap) -> int:
    """Run until SIGTERM; errors that stop the start raise AgentError with a clear message."""
    import uvloop

    logs.setup(boot.log_level)
    raise_fd_limit()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(boot))


async def _main(boot: Bootstrap) -> int:
    return await Agent(boot).run()
