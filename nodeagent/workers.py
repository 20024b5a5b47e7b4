"""The agent's proxy worker processes (``workers: N``, N > 1): start, feed, watch, restart.

The agent binds the listening sockets (or takes them over from its predecessor) and keeps
them: per port one SO_REUSEPORT socket per worker, so the kernel spreads new connections
over the workers by hash (with one shared accept socket, whichever worker woke first
swallowed a burst of connections: no scaling). A worker that dies loses no queued
connection: its sockets stay open here and the restarted worker inherits them again;
capture never changes. eBPF capture registers one of the agent's inbound sockets in its
sockmap; sk_lookup honours the reuseport group.

Each worker is a fresh interpreter (``python -m nodeagent.worker``; gRPC objects do not
survive fork) fed over its own socketpair (``worker_wire``): the snapshot in force and
every new one, the certificates in force (files, rebuilt into contexts by the worker), JWKS
bodies. Requests to workers (metrics, connection counts) are answered from their event
loops within milliseconds and asked synchronously: the agent's loop carries no traffic.
/metrics merges the workers' registries (``worker_wire.merge``) and keeps the counters of
workers that died, so node totals only go up.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeagent import worker_wire as wire
from nodeagent.errors import AgentError
from nodeagent.proxy.listener import ProxyLimits, listen_socket
from nodeagent.proxy.tunnel_plan import TUNNEL_PORT
from nodeagent.state import AgentState, NodeSnapshot

log = logging.getLogger("hostmesh.workers")

START_TIMEOUT = 30.0  # a worker's interpreter start, imports and listener start
QUERY_TIMEOUT = 2.0  # a worker that does not answer within this is considered broken
METRICS_REFRESH = 5.0  # how stale the last-known counters of a worker may get (kept when it dies)
RESTART_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass
class WorkerProcess:
    index: int
    proc: subprocess.Popen
    channel: socket.socket
    state: str = "starting"  # starting -> serving -> draining -> exited
    started: float = field(default_factory=time.time)
    last_families: list[dict] = field(default_factory=list)
    last_refresh: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.configured = Gauge("hostmesh_agent_workers", "Proxy worker processes configured", registry=registry)
        self.running = Gauge("hostmesh_agent_workers_serving", "Proxy worker processes serving now",
                             registry=registry)
        self.restarts = Counter("hostmesh_agent_worker_restarts", "Proxy workers that died and were started "
                                "again (capture and the other workers untouched)", registry=registry)


class WorkerPool:
    def __init__(self, *, count: int, bootstrap: dict, log_level: str, state: AgentState, certs, jwks,
                 registry: CollectorRegistry, local: CollectorRegistry | None = None) -> None:
        self.count = count
        self.local = local  # the agent's own families merged with the workers' (its loop lag)
        self.bootstrap = bootstrap
        self.log_level = log_level
        self.state = state
        self.certs = certs
        self.jwks = jwks
        self.metrics = WorkerMetrics(registry)
        self.metrics.configured.set(count)
        self.workers: list[WorkerProcess | None] = [None] * count
        self.sockets: dict[str, socket.socket] = {}
        self.retired = wire.Retired()
        self.restarts = [0] * count
        self._backoff = [-1] * count  # consecutive quick deaths - 1
        self._pending_restart: set[int] = set()  # slots whose restart failed: tried again by _watch
        self.stopping = False
        self._ids = itertools.count(1)
        self._monitor: asyncio.Task | None = None
        self.metrics.running.set_function(lambda: sum(1 for w in self.workers if w and w.state == "serving"))
        registry.register(_MergedCollector(self))

    # ------------------------------------------------------------------ lifecycle
    async def start(self, inherited: dict[str, socket.socket] | None = None) -> None:
        """Bind the listeners (or use the ``inherited`` ones: a hand-off), keep them open here,
        and start every worker on them; raises AgentError (ProxyError) if one cannot."""
        self.sockets = self._bind(inherited or {})
        self.state.subscribe(self._snapshot_applied)
        if self.certs is not None:
            self.certs.subscribe(self._identities_changed)
        self.jwks.subscribe(self._jwks_changed)
        try:
            await asyncio.gather(*(self._spawn(i) for i in range(self.count)))
        except BaseException:
            self.close()
            raise
        self._monitor = asyncio.get_running_loop().create_task(self._watch())
        log.info("proxy workers serving", extra={"workers": self.count,
                                                 "pids": [w.pid for w in self.workers if w]})

    def _bind(self, inherited: dict[str, list[socket.socket]]) -> dict[str, list[socket.socket]]:
        """Per listener one SO_REUSEPORT socket per worker: the kernel spreads connections over
        them by hash (a shared accept socket lets one worker swallow a burst of connections).
        Inherited sockets are all kept (each holds queued connections) and topped up."""
        b = self.bootstrap
        ports = {"outbound": b["outbound_port"], "inbound": b["inbound_port"]}
        if self.certs is not None:
            ports["tunnel"] = TUNNEL_PORT
        out: dict[str, list[socket.socket]] = {}
        try:
            for name, port in ports.items():
                socks = out[name] = list(inherited.get(name, []))
                while len(socks) < self.count:
                    if socks:  # join the group the inherited sockets hold (no probe: the port is ours)
                        socks.append(_join(socks[0]))
                    else:
                        socks.append(listen_socket("0.0.0.0", port, ProxyLimits().backlog, reuseport=True))
        except BaseException:
            for socks in out.values():
                for s in socks:
                    s.close()
            raise
        return out

    def listening_sockets(self) -> dict[str, list[socket.socket]]:
        return {n: [s for s in socks if s.fileno() >= 0] for n, socks in self.sockets.items()}

    def _share(self, index: int) -> dict[str, list[int]]:
        """Worker ``index`` serves sockets index, index + count, ... of every listener."""
        return {name: [s.fileno() for k, s in enumerate(socks) if k % self.count == index]
                for name, socks in self.sockets.items()}

    @property
    def active_connections(self) -> int:
        st = self.stats()
        return st["outbound"] + st["inbound"]

    def connection_counts(self) -> dict[str, int]:
        st = self.stats()
        return {k: st[k] for k in ("outbound", "inbound", "tunnel")}

    async def _spawn(self, index: int) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = self._share(index)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nodeagent.worker", "--channel", str(child.fileno()),
                 "--parent", str(os.getpid()), "--log-level", self.log_level],
                pass_fds=[child.fileno(), *(fd for v in fds.values() for fd in v)], stdin=subprocess.DEVNULL)
        finally:
            child.close()
        parent.settimeout(QUERY_TIMEOUT)
        w = WorkerProcess(index, proc, parent)
        self.workers[index] = w
        try:
            for msg in self._initial_messages(index, fds):
                wire.send(parent, msg)
            parent.settimeout(START_TIMEOUT)
            ready = await asyncio.to_thread(wire.recv, parent)
            parent.settimeout(QUERY_TIMEOUT)
        except wire.WorkerChannelError as exc:
            self._kill(w)
            code = proc.poll()
            raise AgentError(f"proxy worker {index} did not start ({exc}"
                             + (f"; it exited with code {code}" if code is not None else "")
                             + "); see the agent's log") from None
        if ready.get("type") != "ready":
            self._kill(w)
            raise AgentError(f"proxy worker {index} did not start: it sent {ready.get('type')!r}")
        w.state = "serving"
        log.info("proxy worker started", extra={"worker": index, "pid": proc.pid})

    def _initial_messages(self, index: int, fds: dict[str, list[int]]) -> list[dict]:
        out = [{"type": "init", "bootstrap": self.bootstrap, "worker": index, "listeners": fds,
                "identities": self.certs is not None}]
        if self.state.snapshot is not None:
            out.append({"type": "snapshot", "snapshot": self.state.snapshot.to_dict()})
        if self.certs is not None:
            out.append(self._identities_message())
        for uri, body in self.jwks.bodies().items():
            out.append({"type": "jwks", "uri": uri, "body": body.decode("latin-1")})
        out.append({"type": "start"})
        return out

    async def _watch(self) -> None:
        """Restart workers that die (with backoff); refresh their last-known counters."""
        while not self.stopping:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            for i, w in enumerate(self.workers):
                if self.stopping:
                    break
                if w is None:
                    if i in self._pending_restart:
                        self._pending_restart.discard(i)
                        await self._retry_spawn(i)
                    continue
                if w.proc.poll() is not None:
                    await self._replace(i, w)
                elif w.state == "serving" and now - w.last_refresh >= METRICS_REFRESH:
                    self._query_families(w)

    async def _replace(self, i: int, w: WorkerProcess) -> None:
        log.error("proxy worker died; starting it again (capture and the other workers are untouched)",
                  extra={"worker": i, "pid": w.pid, "exit_code": w.proc.returncode})
        self.retired.add(w.last_families)
        w.state = "exited"
        w.channel.close()
        self.workers[i] = None
        self.metrics.restarts.inc()
        self.restarts[i] += 1
        # a worker that keeps dying at once is started again ever more slowly
        self._backoff[i] = self._backoff[i] if time.time() - w.started < 60 else -1
        await self._retry_spawn(i)

    async def _retry_spawn(self, i: int) -> None:
        self._backoff[i] += 1
        await asyncio.sleep(RESTART_BACKOFF[min(self._backoff[i], len(RESTART_BACKOFF) - 1)])
        if self.stopping:
            return
        try:
            await self._spawn(i)
        except AgentError as exc:
            log.error("proxy worker restart failed; trying again", extra={"worker": i, "error": str(exc)})
            self.workers[i] = None
            self._pending_restart.add(i)

    def stop_accepting(self) -> None:
        """Every worker closes its listening sockets; so does the agent (a successor has them)."""
        self.stopping = True
        self._broadcast({"type": "stop_accepting"})
        self._close_sockets()

    async def drain(self, grace: float) -> int:
        """Workers stop accepting, drain for ``grace`` and exit; those still running after
        grace + 10 s are killed. Returns how many had to be killed."""
        self.stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
        for w in self._live():
            self._query_families(w)  # the counters up to now, for the last scrape
        self._broadcast({"type": "drain", "grace": grace})
        for w in self._live():
            w.state = "draining"
        self._close_sockets()  # with the workers' copies closed too, new connections are refused
        deadline = time.monotonic() + grace + 10.0
        while any(w.proc.poll() is None for w in self._live()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        killed = 0
        for w in self._live():
            if w.proc.poll() is None:
                killed += 1
                self._kill(w)
            self.retired.add(w.last_families)
            w.state = "exited"
        return killed

    def close(self) -> None:
        self.stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
        for w in self._live():
            self._kill(w)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for socks in self.sockets.values():
            for s in socks:
                s.close()

    def _kill(self, w: WorkerProcess) -> None:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGKILL)
            try:
                w.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        w.state = "exited"
        w.channel.close()

    def _live(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w is not None and w.state != "exited"]

    # ------------------------------------------------------------------ feeding
    def _snapshot_applied(self, snapshot: NodeSnapshot) -> None:
        self._broadcast({"type": "snapshot", "snapshot": snapshot.to_dict()})

    def _identities_message(self) -> dict:
        return {"type": "identities", "trust_domain": self.certs.trust_domain, "identities": self.certs.held_files()}

    def _identities_changed(self) -> None:
        self._broadcast(self._identities_message())

    def _jwks_changed(self, uri: str, body: bytes | None) -> None:
        self._broadcast({"type": "jwks", "uri": uri, "body": body.decode("latin-1") if body is not None else None})

    def _broadcast(self, msg: dict) -> None:
        data = wire.encode(msg)
        for w in self._live():
            try:
                w.channel.sendall(data)
            except OSError as exc:
                # a worker that cannot take its config must not serve with an old one
                log.error("proxy worker does not take messages; killing it", extra={"worker": w.index,
                                                                                      "error": str(exc)})
                self._kill_for_restart(w)

    def _kill_for_restart(self, w: WorkerProcess) -> None:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGKILL)

    # ------------------------------------------------------------------ asking
    def _request(self, w: WorkerProcess, kind: str) -> dict | None:
        rid = next(self._ids)
        try:
            wire.send(w.channel, {"type": kind, "id": rid})
            while True:
                msg = wire.recv(w.channel)
                if msg.get("type") == "reply" and msg.get("id") == rid:
                    return msg
        except wire.WorkerChannelError as exc:
            log.error("proxy worker does not answer; killing it", extra={"worker": w.index, "error": str(exc)})
            self._kill_for_restart(w)
            return None

    def _query_families(self, w: WorkerProcess) -> list[dict]:
        if w.state != "serving" and w.state != "draining":
            return w.last_families
        msg = self._request(w, "metrics")
        if msg is not None and isinstance(msg.get("families"), list):
            w.last_families = msg["families"]
            w.last_refresh = time.monotonic()
        return w.last_families

    def families(self) -> list[list[dict]]:
        out = [self.retired.as_families()]
        if self.local is not None:
            out.append(wire.families(self.local))
        for w in self.workers:
            if w is not None and w.state in ("serving", "draining") and w.proc.poll() is None:
                out.append(self._query_families(w))
            elif w is not None and w.state != "exited":  # an exited worker's counters are in retired
                out.append(w.last_families)
        return out

    def describe(self) -> list[dict]:
        """Each worker's own account of the config it holds."""
        out = []
        for i, w in enumerate(self.workers):
            msg = self._request(w, "describe") if w is not None and w.state == "serving" else None
            out.append({k: v for k, v in msg.items() if k not in ("type", "id")} if msg else
                       {"worker": i, "state": w.state if w else "restarting"})
        return out

    def resilience(self) -> list[dict]:
        """Each serving worker's ``resilience.state_view`` (merged by the caller)."""
        out = []
        for w in self.workers:
            msg = self._request(w, "resilience") if w is not None and w.state == "serving" else None
            if msg:
                out.append(msg.get("destinations") or {})
        return out

    def stats(self) -> dict:
        """Connections by listener, summed over the workers, and each worker's state."""
        total = {"outbound": 0, "inbound": 0, "tunnel": 0}
        procs = []
        for i, w in enumerate(self.workers):
            if w is None:
                procs.append({"index": i, "state": "restarting", "restarts": self.restarts[i]})
                continue
            entry = {"index": i, "pid": w.pid, "state": w.state, "restarts": self.restarts[i],
                     "uptime_seconds": round(time.time() - w.started, 3)}
            if w.state in ("serving", "draining") and w.proc.poll() is None:
                msg = self._request(w, "stats")
                if msg is not None:
                    for k in total:
                        total[k] += int(msg.get(k, 0))
                    entry["active_connections"] = int(msg.get("outbound", 0)) + int(msg.get("inbound", 0))
            procs.append(entry)
        return {**total, "workers": procs}


def _join(member: socket.socket) -> socket.socket:
    """Another listening socket in ``member``'s SO_REUSEPORT group (same address and port)."""
    host, port = member.getsockname()[:2]
    sock = socket.socket(member.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if member.getsockopt(socket.SOL_IP, IP_TRANSPARENT):
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(ProxyLimits().backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise AgentError(f"cannot add a listening socket on {host}:{port} for a worker: {exc.strerror or exc} "
                         "(the previous agent's sockets were bound without SO_REUSEPORT?)") from None
    return sock


IP_TRANSPARENT = 19


class _MergedCollector:
    """The workers' metric families, merged, on the agent's registry."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self):
        return wire.merge(self.pool.families())

    def describe(self):
        return []  # no fixed names: collected at scrape time only
