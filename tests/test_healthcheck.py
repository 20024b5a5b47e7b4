"""Active health checks (nodeagent/healthcheck.py), the parts tests/test_healthcheck_probe.py
does not cover: gRPC probes against the test app's grpc.health.v1 service, every probe under
uvloop (the agent's loop), the exact HTTP request a probe sends, ``port:`` selecting one
Service port, the checker's metrics and its cancellation. Loopback only, no root needed
(as root the probe sockets really carry SO_MARK; otherwise the mark is skipped).

Unhealthy keys are compared on their (address, port) prefix: the checker may key health per
Service too (address, port, service)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from meshlab.testapp.httpserver import HTTPApp
from nodeagent.healthcheck import (HealthChecker, HealthCheckPolicy, Target, probe_grpc, probe_http,
                                   probe_targets, probe_tcp)
from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot, Service, ServicePort

pytestmark = pytest.mark.timeout(60)

LO = "127.0.0.1"
NODE = "node-1"
MARK = 0x100


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def free_port() -> int:
    s = socket.socket()
    s.bind((LO, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def traffic_policy(hc: dict | None, target: str = "web", namespace: str = "shop") -> ConfigObject:
    spec = {"targetRef": {"kind": "Service", "name": target}}
    if hc is not None:
        spec["healthCheck"] = hc
    return ConfigObject("TrafficPolicy", namespace, f"tp-{target}", json.dumps(spec))


def pairs(keys) -> set[tuple[str, int]]:
    return {(k[0], k[1]) for k in keys}


class StatusServer:
    """A raw HTTP/1.1 server answering every request with ``self.status``; keeps the requests."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[bytes] = []
        self.server = None
        self.port = 0

    async def start(self) -> "StatusServer":
        self.server = await asyncio.start_server(self._handle, LO, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            writer.write(f"HTTP/1.1 {self.status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.server.close()


# ============================================================================ policy & targets

def test_policy_durations_kinds_and_missing_kind():
    p = HealthCheckPolicy.from_spec({"grpc": {"service": "hostmesh.testapp.v1.Echo"}, "interval": "1h30m",
                                     "timeout": "500ms", "jitter": "0s", "unhealthyThreshold": 5,
                                     "healthyThreshold": 1, "port": 81})
    assert (p.kind, p.interval, p.timeout, p.jitter, p.unhealthy_threshold, p.healthy_threshold, p.port,
            p.grpc_service) == ("grpc", 5400.0, 0.5, 0.0, 5, 1, 81, "hostmesh.testapp.v1.Echo")
    assert HealthCheckPolicy.from_spec({"grpc": {}}).grpc_service == ""
    t = HealthCheckPolicy.from_spec({"tcp": {}})
    assert (t.kind, t.port) == ("tcp", None)
    assert HealthCheckPolicy.from_spec({"interval": "5s"}) is None  # no http/tcp/grpc: no check
    assert HealthCheckPolicy.from_spec(None) is None and HealthCheckPolicy.from_spec({}) is None
    h = HealthCheckPolicy.from_spec({"http": {"path": "/ready?full=1", "expectedStatuses": [200, 503]}})
    assert h.path == "/ready?full=1" and h.status_ok(503) and h.status_ok(200) and not h.status_ok(204)
    d = HealthCheckPolicy.from_spec({"http": {"path": "/"}})
    assert d.status_ok(200) and d.status_ok(399) and not d.status_ok(400) and not d.status_ok(199)


def multi_port_snapshot(hc: dict | None, *, node: str = NODE, extra_config=()) -> NodeSnapshot:
    eps = (Endpoint("10.0.0.1", 8080, NODE, "a", "shop"), Endpoint("10.0.0.1", 9090, NODE, "a", "shop"),
           Endpoint("10.0.0.2", 8080, "node-2", "b", "shop"), Endpoint("10.0.0.2", 9090, "node-2", "b", "shop"))
    web = Service("web", "shop", "198.19.0.10", (ServicePort(80, 8080, "http"), ServicePort(81, 9090, "admin")), eps)
    other = Service("db", "shop", "198.19.0.11", (ServicePort(5432, 5432),),
                    (Endpoint("10.0.0.3", 5432, NODE, "c", "shop"),))
    config = ((traffic_policy(hc),) if hc is not None else ()) + tuple(extra_config)
    return NodeSnapshot(node, (web, other), config=config)


def addr_ports(targets) -> list[tuple[str, int]]:
    return sorted((t.address, t.port) for t in targets)


def test_probe_targets_ports_nodes_and_namespaces():
    # without port: every Service port's own endpoints on their target ports, this node's only
    targets = probe_targets(multi_port_snapshot({"tcp": {}}), NODE)
    assert addr_ports(targets) == [("10.0.0.1", 8080), ("10.0.0.1", 9090)]
    assert {t.host for t in targets} == {"web.shop.svc.cluster.local"}
    assert all(p.kind == "tcp" for p in targets.values())
    # port: 81 -> only the endpoints of that Service port (its targetPort 9090)
    assert addr_ports(probe_targets(multi_port_snapshot({"tcp": {}, "port": 81}), NODE)) == [("10.0.0.1", 9090)]
    assert addr_ports(probe_targets(multi_port_snapshot({"tcp": {}, "port": 80}), NODE)) == [("10.0.0.1", 8080)]
    # the other node probes its own endpoints
    assert addr_ports(probe_targets(multi_port_snapshot({"tcp": {}}, node="node-2"), "node-2")) == \
        [("10.0.0.2", 8080), ("10.0.0.2", 9090)]
    # a TrafficPolicy without healthCheck, or one in another namespace, probes nothing
    assert probe_targets(multi_port_snapshot({}), NODE) == {}
    assert probe_targets(multi_port_snapshot(None, extra_config=(traffic_policy({"tcp": {}}, namespace="other"),)),
                         NODE) == {}
    # a policy for the other Service
    db = probe_targets(multi_port_snapshot(None, extra_config=(traffic_policy({"http": {"path": "/"}}, "db"),)), NODE)
    assert addr_ports(db) == [("10.0.0.3", 5432)] and [p.kind for p in db.values()] == ["http"]
    assert probe_targets(None, NODE) == {}


# ============================================================================ probes (uvloop)

def test_tcp_and_http_probes_under_uvloop_with_a_mark():
    async def main():
        app = HTTPApp("a", NODE)
        server = await asyncio.get_running_loop().create_server(app.protocol_factory, LO, 0)
        port = server.sockets[0].getsockname()[1]
        fast = HealthCheckPolicy(kind="http", timeout=0.5, path="/healthz")
        try:
            await probe_tcp(Target(LO, port, "web"), fast, MARK)
            with pytest.raises(OSError):
                await probe_tcp(Target(LO, free_port(), "web"), fast, MARK)
            await probe_http(Target(LO, port, "web"), fast, MARK)
            with pytest.raises(Exception, match="503"):
                await probe_http(Target(LO, port, "web"), HealthCheckPolicy(kind="http", timeout=0.5,
                                                                            path="/?status=503"), MARK)
            # 503 is fine when it is expected
            await probe_http(Target(LO, port, "web"), HealthCheckPolicy(kind="http", timeout=0.5, path="/?status=503",
                                                                        expected=(503,)), MARK)
            with pytest.raises(OSError):
                await probe_http(Target(LO, free_port(), "web"), fast, MARK)
        finally:
            app.close_all()
            server.close()
    run(main())


def test_http_probe_request_bytes_and_bad_answers():
    async def main():
        srv = await StatusServer(204).start()
        try:
            await probe_http(Target(LO, srv.port, "web.shop.svc.cluster.local"),
                             HealthCheckPolicy(kind="http", timeout=0.5, path="/ready?x=1"))
            head = srv.requests[0]
            assert head.startswith(b"GET /ready?x=1 HTTP/1.1\r\n")
            lines = [line.lower() for line in head.split(b"\r\n")]
            assert b"host: web.shop.svc.cluster.local" in lines and b"connection: close" in lines
        finally:
            srv.close()

        async def garbage(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
            await writer.drain()
            writer.close()

        async def endless(reader, writer):  # a status line that never ends: bounded, fails
            await reader.readuntil(b"\r\n\r\n")
            try:
                for _ in range(200):
                    writer.write(b"A" * 4096)
                    await writer.drain()
                    await asyncio.sleep(0)
            except ConnectionError:
                pass
            writer.close()

        async def hangs_up(reader, writer):
            writer.close()

        policy = HealthCheckPolicy(kind="http", timeout=1.0, path="/")
        for handler in (garbage, endless, hangs_up):
            server = await asyncio.start_server(handler, LO, 0)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(Exception):
                await probe_http(Target(LO, server.sockets[0].getsockname()[1], "web"), policy)
            assert loop.time() - t0 < policy.timeout + 0.5, handler.__name__
            server.close()
    run(main())


def test_probes_time_out_on_a_silent_listener():
    async def main():
        silent = socket.socket()
        silent.bind((LO, 0))
        silent.listen(8)  # the kernel accepts; nobody ever answers
        port = silent.getsockname()[1]
        loop = asyncio.get_running_loop()
        try:
            for probe, kind in ((probe_http, "http"), (probe_grpc, "grpc")):
                t0 = loop.time()
                with pytest.raises(Exception):
                    await probe(Target(LO, port, "web"), HealthCheckPolicy(kind=kind, timeout=0.3, path="/"))
                assert 0.2 < loop.time() - t0 < 1.5, kind
        finally:
            silent.close()
    run(main())


def test_grpc_probe_against_the_test_app():
    pytest.importorskip("grpc_health")
    from grpc_health.v1 import health_pb2

    from meshlab.testapp.grpc_service import SERVICE_NAME, start_server

    async def main():
        server, port, health, _echo = await start_server("a", NODE, LO, 0)
        target = Target(LO, port, "web")
        policy = HealthCheckPolicy(kind="grpc", timeout=1.0)
        try:
            await probe_grpc(target, policy)
            await probe_grpc(target, HealthCheckPolicy(kind="grpc", timeout=1.0, grpc_service=SERVICE_NAME), MARK)
            with pytest.raises(Exception):  # NOT_FOUND: the server does not know that service
                await probe_grpc(target, HealthCheckPolicy(kind="grpc", timeout=1.0, grpc_service="no.such.Service"))
            await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            with pytest.raises(Exception, match="NOT_SERVING"):
                await probe_grpc(target, policy)
            await health.set("", health_pb2.HealthCheckResponse.SERVING)
            await probe_grpc(target, policy)
            with pytest.raises(Exception):  # nothing listens
                await probe_grpc(Target(LO, free_port(), "web"), policy)
        finally:
            await server.stop(0)
    run(main())


# ============================================================================ the checker

def checker_snapshot(port: int, hc: dict | None) -> NodeSnapshot:
    svc = Service("web", "shop", "198.19.0.10", (ServicePort(80, port),),
                  (Endpoint(LO, port, NODE, "a", "shop"), Endpoint("10.9.9.9", port, "node-2", "b", "shop")))
    return NodeSnapshot(NODE, (svc,), config=(traffic_policy(hc),) if hc is not None else ())


async def until(pred, timeout: float, what: str) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not pred():
        if loop.time() - t0 > timeout:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return loop.time() - t0


def sample(registry: CollectorRegistry, name: str, **labels) -> float:
    value = registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_checker_end_to_end_metrics_and_stop():
    async def main():
        srv = await StatusServer(503).start()
        hc = {"http": {"path": "/healthz"}, "interval": "50ms", "timeout": "200ms", "jitter": "10ms",
              "unhealthyThreshold": 3, "healthyThreshold": 2}
        snap = {"s": checker_snapshot(srv.port, hc)}
        seen: list = []
        registry = CollectorRegistry()
        checker = HealthChecker(NODE, lambda: snap["s"], seen.append, mark=MARK, rand=lambda: 0.5,
                                registry=registry)
        checker.start()
        try:
            # 3 failures: first at 25ms, then every 50ms + 5ms -> ~135ms; allow slack
            took = await until(lambda: seen, 2.0, "the endpoint to fail")
            assert took < 0.05 * 3 + 0.5
            assert pairs(seen[-1]) == {(LO, srv.port)}  # only this node's endpoint is probed
            assert sample(registry, "hostmesh_agent_health_unhealthy_endpoints") == 1
            assert sample(registry, "hostmesh_agent_health_checks_total", result="fail") >= 3
            (entry,) = checker.describe()
            assert entry["healthy"] is False

            srv.status = 200  # recovers: back after 2 successes
            await until(lambda: not seen[-1], 2.0, "the endpoint to recover")
            assert len(seen) == 2
            assert sample(registry, "hostmesh_agent_health_unhealthy_endpoints") == 0
            assert sample(registry, "hostmesh_agent_health_checks_total", result="ok") >= 2
            assert checker.describe()[0]["healthy"] is True

            # fails again, then the policy goes away: probing stops and the set is empty
            srv.status = 500
            await until(lambda: len(seen) == 3, 2.0, "the second failure")
            snap["s"] = checker_snapshot(srv.port, None)
            checker.refresh()
            assert seen[-1] == frozenset() and checker.describe() == []
            await asyncio.sleep(0.05)  # a probe cancelled mid-flight may still have reached the server
            n = len(srv.requests)
            await asyncio.sleep(0.2)
            assert len(srv.requests) == n

            # the policy comes back, then stop(): no task survives, no probe after it
            snap["s"] = checker_snapshot(srv.port, hc)
            checker.refresh()
            await until(lambda: len(srv.requests) > n, 2.0, "probing to resume")
        finally:
            await checker.stop()
        assert checker.describe() == []
        await asyncio.sleep(0.05)
        n = len(srv.requests)
        await asyncio.sleep(0.2)
        assert len(srv.requests) == n
        srv.close()
    run(main())


def test_checker_first_probe_waits_a_random_share_of_the_interval():
    async def main():
        srv = await StatusServer(200).start()
        hc = {"tcp": {}, "interval": "400ms", "timeout": "100ms", "jitter": "0s"}
        accepted: list[float] = []
        loop = asyncio.get_running_loop()

        def count(reader, writer):
            accepted.append(loop.time())
            writer.close()
        server = await asyncio.start_server(count, LO, 0)
        port = server.sockets[0].getsockname()[1]
        checker = HealthChecker(NODE, lambda: checker_snapshot(port, hc), lambda s: None, rand=lambda: 0.75)
        t0 = loop.time()
        checker.start()
        try:
            await until(lambda: accepted, 2.0, "the first probe")
            assert accepted[0] - t0 >= 0.25  # 0.75 x 400ms = 300ms
        finally:
            await checker.stop()
            server.close()
            srv.close()
    run(main())
