"""Active health checks (TrafficPolicy ``healthCheck``): the agent probes the endpoints that
run on its own node and reports the ones it finds unhealthy to the control plane, which
carries them to every agent (``controlplane/health.py``); the balancers skip them, down to
the panic threshold (``nodeagent/proxy/l7/lb.py``).

So each endpoint is probed once in the mesh, by its own node: 100 client pods do not mean
100 probes, and probes never cross the network, so they need no mTLS and no capture
exception on another node. A probe socket carries the proxy's socket mark, which capture
skips. (gRPC probes use grpcio, which cannot set it; they are node-local plain TCP from the
node's namespace, which no capture rule redirects.)

* ``HealthCheckPolicy.from_spec`` — defaults: interval 10 s, timeout 1 s, unhealthyThreshold
  3, healthyThreshold 2, jitter 1 s; ``http`` (GET ``path``, Host the Service's name,
  ``expectedStatuses`` or any 200-399), ``tcp`` (a connect) or ``grpc``
  (grpc.health.v1 Check is SERVING).
* ``HealthTracker`` (no I/O) — consecutive results -> healthy/unhealthy. An endpoint starts
  healthy (as Envoy's default): a new pod takes traffic until its checks fail.
* ``HealthChecker`` — one task per probed endpoint, first probe at a random point of the
  interval (probes of many endpoints spread out), then every interval + jitter.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from dataclasses import dataclass
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeagent.proxy.destinations import service_endpoints
from nodeagent.proxy.l7.routing import parse_duration, traffic_policy_specs
from nodeagent.state import NodeSnapshot

log = logging.getLogger(__name__)

SO_MARK = 36
MAX_STATUS_LINE = 4096
_warned: list = []  # the SO_MARK warning went out (once per process)


def _seconds(value: Any, default: float) -> float:
    if value is None:
        return default
    try:
        return parse_duration(value)
    except ValueError:
        return default


@dataclass(frozen=True, slots=True)
class HealthCheckPolicy:
    kind: str = "tcp"  # http | tcp | grpc
    interval: float = 10.0
    timeout: float = 1.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    jitter: float = 1.0
    port: int | None = None  # a Service port number: only its endpoints
    path: str = "/"
    expected: tuple[int, ...] = ()  # empty: 200-399
    grpc_service: str = ""

    @classmethod
    def from_spec(cls, spec: dict | None) -> "HealthCheckPolicy | None":
        if not spec:
            return None
        kind = next((k for k in ("http", "tcp", "grpc") if k in spec), None)
        if kind is None:
            return None
        http = spec.get("http") or {}
        return cls(kind, _seconds(spec.get("interval"), 10.0), _seconds(spec.get("timeout"), 1.0),
                   int(spec.get("unhealthyThreshold", 3)), int(spec.get("healthyThreshold", 2)),
                   _seconds(spec.get("jitter"), 1.0), spec.get("port"), str(http.get("path", "/")),
                   tuple(int(s) for s in http.get("expectedStatuses") or ()),
                   str((spec.get("grpc") or {}).get("service", "")))

    def status_ok(self, status: int) -> bool:
        return status in self.expected if self.expected else 200 <= status < 400


@dataclass(frozen=True, slots=True)
class Target:
    address: str
    port: int
    host: str  # the Host header of HTTP probes: the Service's name
    service: str = ""  # "namespace/name": health is per Service

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.address, self.port, self.service)


class HealthTracker:
    """Consecutive probe results per endpoint key -> the set of unhealthy ones."""

    def __init__(self) -> None:
        self._down: set[tuple] = set()
        self._streak: dict[tuple, int] = {}  # > 0: successes in a row, < 0: failures

    def record(self, key: tuple, ok: bool, policy: HealthCheckPolicy) -> bool:
        """One result; True when it changed the endpoint's health."""
        n = self._streak.get(key, 0)
        n = (n + 1 if n > 0 else 1) if ok else (n - 1 if n < 0 else -1)
        self._streak[key] = n
        if key in self._down and n >= policy.healthy_threshold:
            self._down.discard(key)
            return True
        if key not in self._down and -n >= policy.unhealthy_threshold:
            self._down.add(key)
            return True
        return False

    def unhealthy(self) -> frozenset[tuple]:
        return frozenset(self._down)

    def streak(self, key: tuple) -> int:
        return self._streak.get(key, 0)

    def forget(self, key: tuple) -> bool:
        self._streak.pop(key, None)
        if key in self._down:
            self._down.discard(key)
            return True
        return False


def probe_targets(snapshot: NodeSnapshot | None, node: str) -> dict[Target, HealthCheckPolicy]:
    """The endpoints on ``node`` of every Service whose TrafficPolicy has a healthCheck."""
    if snapshot is None:
        return {}
    policies: dict[tuple[str, str], HealthCheckPolicy | None] = {}
    for key, spec in traffic_policy_specs(snapshot).items():
        try:
            policies[key] = HealthCheckPolicy.from_spec(spec.get("healthCheck"))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    out: dict[Target, HealthCheckPolicy] = {}
    for svc in snapshot.services:
        hc = policies.get((svc.namespace, svc.name))  # None: no policy, or one without healthCheck
        if hc is None:
            continue
        for port in svc.ports:
            if hc.port is not None and port.port != hc.port:
                continue
            for e in service_endpoints(svc, port):
                if e.node == node:
                    out.setdefault(Target(e.address, e.port, svc.hostname, f"{svc.namespace}/{svc.name}"), hc)
    return out


# ------------------------------------------------------------------ probes

async def _connect(address: str, port: int, mark: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if mark:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            except PermissionError:  # no CAP_NET_ADMIN (tests): unmarked
                if not _warned:
                    _warned.append(True)
                    log.warning("health check probes go unmarked: setting SO_MARK needs CAP_NET_ADMIN")
        await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=MAX_STATUS_LINE)


async def probe_tcp(target: Target, policy: HealthCheckPolicy, mark: int = 0) -> None:
    """Raises when the endpoint does not accept a connection within the timeout."""
    async def go():
        _, w = await _connect(target.address, target.port, mark)
        w.close()
    await asyncio.wait_for(go(), policy.timeout)


async def probe_http(target: Target, policy: HealthCheckPolicy, mark: int = 0) -> None:
    """Raises unless a GET of the path answers an expected status within the timeout."""
    async def go():
        r, w = await _connect(target.address, target.port, mark)
        try:
            w.write(f"GET {policy.path} HTTP/1.1\r\nhost: {target.host}\r\nuser-agent: hostmesh-health-check\r\n"
                    f"connection: close\r\n\r\n".encode("latin-1"))
            line = await r.readline()
        finally:
            w.close()
        parts = line[:MAX_STATUS_LINE].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ConnectionError(f"not an HTTP/1.x answer: {line[:80]!r}")
        if not policy.status_ok(int(parts[1])):
            raise ConnectionError(f"status {int(parts[1])}")
    await asyncio.wait_for(go(), policy.timeout)


async def probe_grpc(target: Target, policy: HealthCheckPolicy, mark: int = 0) -> None:
    """Raises unless grpc.health.v1.Health/Check answers SERVING within the timeout."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    async with grpc.aio.insecure_channel(f"{target.address}:{target.port}",
                                         options=[("grpc.enable_http_proxy", 0)]) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=policy.grpc_service), timeout=policy.timeout)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise ConnectionError(f"gRPC health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")


PROBES = {"tcp": probe_tcp, "http": probe_http, "grpc": probe_grpc}


# ------------------------------------------------------------------ the checker

class HealthChecker:
    """Probes this node's endpoints; ``on_change(unhealthy)`` on every change of the set."""

    def __init__(self, node: str, snapshot: Callable[[], NodeSnapshot | None],
                 on_change: Callable[[frozenset[tuple]], None], *, mark: int = 0,
                 rand: Callable[[], float] = random.random, registry: CollectorRegistry | None = None) -> None:
        self.node = node
        self.snapshot = snapshot
        self.on_change = on_change
        self.mark = mark
        self.rand = rand
        self.tracker = HealthTracker()
        self._tasks: dict[Target, tuple[HealthCheckPolicy, asyncio.Task]] = {}
        self._last: dict[Target, str] = {}  # the last result: "ok" or the error
        self._started = False
        self.checks = self.unhealthy_gauge = None
        if registry is not None:
            self.checks = Counter("hostmesh_agent_health_checks", "Active health check probes of this node's "
                                  "endpoints, by result.", ["result"], registry=registry)
            self.unhealthy_gauge = Gauge("hostmesh_agent_health_unhealthy_endpoints",
                                         "This node's endpoints failing their health checks.", registry=registry)

    def start(self) -> None:
        self._started = True
        self.refresh()

    def refresh(self, *_: Any) -> None:
        """Follow the snapshot: probe new targets, stop probing gone ones."""
        if not self._started:
            return
        targets = probe_targets(self.snapshot(), self.node)
        changed = False
        for t in [t for t, (p, _) in self._tasks.items() if targets.get(t) != p]:
            _, task = self._tasks.pop(t)
            task.cancel()
            self._last.pop(t, None)
            if t not in targets:
                changed |= self.tracker.forget(t.key)
        for t, policy in targets.items():
            if t not in self._tasks:
                self._tasks[t] = (policy, asyncio.get_running_loop().create_task(self._probe_loop(t, policy)))
        if changed:
            self._changed()

    async def stop(self) -> None:
        self._started = False
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _probe_loop(self, target: Target, policy: HealthCheckPolicy) -> None:
        probe = PROBES[policy.kind]
        await asyncio.sleep(self.rand() * policy.interval)
        while True:
            try:
                await probe(target, policy, self.mark)
                ok, result = True, "ok"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure to answer as expected is a failed check
                ok, result = False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._last[target] = result
            if self.checks is not None:
                self.checks.labels("ok" if ok else "fail").inc()
            if self.tracker.record(target.key, ok, policy):
                log.warning("health check %s: %s:%d of %s (%s)", "passing again" if ok else "failing",
                            target.address, target.port, target.host, result)
                self._changed()
            await asyncio.sleep(policy.interval + self.rand() * policy.jitter)

    def _changed(self) -> None:
        down = self.tracker.unhealthy()
        if self.unhealthy_gauge is not None:
            self.unhealthy_gauge.set(len(down))
        try:
            self.on_change(down)
        except Exception:  # the reporter's problem must not stop the probes
            log.exception("health check: reporting the unhealthy endpoints failed")

    def describe(self) -> list[dict[str, Any]]:
        down = self.tracker.unhealthy()
        return [{"endpoint": f"{t.address}:{t.port}", "service": t.host, "check": p.kind,
                 "healthy": t.key not in down, "streak": self.tracker.streak(t.key),
                 "last": self._last.get(t)} for t, (p, _) in sorted(self._tasks.items(), key=lambda i: (i[0].address,
                                                                                                        i[0].port))]
