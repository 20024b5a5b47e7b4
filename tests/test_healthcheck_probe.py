"""Active health checks on the agent side (nodeagent/healthcheck.py): the tracker's thresholds,
which endpoints a node probes, and the probes against real loopback servers."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from meshlab.testapp.httpserver import HTTPApp
from nodeagent.healthcheck import (HealthChecker, HealthCheckPolicy, HealthTracker, Target, probe_http,
                                   probe_targets, probe_tcp)
from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot, Service, ServicePort

pytestmark = pytest.mark.timeout(60)

LO = "127.0.0.1"


def policy_object(hc: dict, name: str = "web") -> ConfigObject:
    return ConfigObject("TrafficPolicy", "shop", name, json.dumps({"targetRef": {"kind": "Service", "name": name},
                                                                   "healthCheck": hc}))


def snapshot(endpoints, hc: dict | None, ports=((80, 8080),)) -> NodeSnapshot:
    svc = Service("web", "shop", "198.19.0.10", tuple(ServicePort(p, t) for p, t in ports), tuple(endpoints))
    return NodeSnapshot("node-1", (svc,), config=(policy_object(hc),) if hc else ())


def test_tracker_thresholds_and_no_flapping():
    p = HealthCheckPolicy(unhealthy_threshold=2, healthy_threshold=2)
    t, k = HealthTracker(), ("10.0.0.1", 80)
    assert not t.record(k, False, p) and t.record(k, False, p) and t.unhealthy() == {k}
    for ok in (True, False, True, False):  # alternating: stays down
        assert not t.record(k, ok, p)
    assert not t.record(k, True, p) and t.record(k, True, p) and t.unhealthy() == frozenset()


def test_policy_defaults_and_targets_of_this_node_only():
    p = HealthCheckPolicy.from_spec({"http": {"path": "/healthz"}})
    assert (p.kind, p.interval, p.timeout, p.unhealthy_threshold, p.healthy_threshold, p.jitter) == \
        ("http", 10.0, 1.0, 3, 2, 1.0)
    assert p.status_ok(204) and not p.status_ok(500)
    assert not HealthCheckPolicy.from_spec({"http": {"path": "/", "expectedStatuses": [204]}}).status_ok(200)
    eps = [Endpoint("10.0.0.1", 8080, "node-1", "a", "shop"), Endpoint("10.0.0.2", 8080, "node-2", "b", "shop")]
    targets = probe_targets(snapshot(eps, {"tcp": {}}), "node-1")
    assert [(t.address, t.port, t.host) for t in targets] == [("10.0.0.1", 8080, "web.shop.svc.cluster.local")]
    assert probe_targets(snapshot(eps, None), "node-1") == {}
    two = snapshot(eps[:1], {"tcp": {}, "port": 81}, ports=((80, 8080), (81, 9090)))
    assert probe_targets(two, "node-1") == {}  # endpoints serve 8080 only (the Service's targetPort 9090 is not theirs)


def test_probes_against_loopback_servers():
    async def main():
        app = HTTPApp("a", "node-1")
        server = await asyncio.get_running_loop().create_server(app.protocol_factory, LO, 0)
        port = server.sockets[0].getsockname()[1]
        silent = socket.socket()
        silent.bind((LO, 0))
        silent.listen(8)  # accepts, never answers
        closed = socket.socket()
        closed.bind((LO, 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        t = lambda p: Target(LO, p, "web")  # noqa: E731
        fast = HealthCheckPolicy(kind="http", timeout=0.3, path="/healthz")
        await probe_tcp(t(port), fast)
        with pytest.raises(OSError):
            await probe_tcp(t(closed_port), fast)
        await probe_http(t(port), fast)
        with pytest.raises(ConnectionError, match="status 503"):
            await probe_http(t(port), HealthCheckPolicy(kind="http", timeout=0.3, path="/?status=503"))
        with pytest.raises(asyncio.TimeoutError):
            await probe_http(t(silent.getsockname()[1]), fast)
        silent.close()
        app.close_all()
        server.close()
    asyncio.run(main())


def test_checker_reports_a_failing_endpoint_and_its_recovery():
    async def main():
        app = HTTPApp("a", "node-1")
        server = await asyncio.get_running_loop().create_server(app.protocol_factory, LO, 0)
        port = server.sockets[0].getsockname()[1]
        path = {"p": "/?status=503"}
        hc = {"http": {"path": "/?status=503"}, "interval": "50ms", "timeout": "200ms", "jitter": "0s",
              "unhealthyThreshold": 2, "healthyThreshold": 1}
        snap = {"s": snapshot([Endpoint(LO, port, "node-1", "a", "shop")], hc)}
        seen: list = []
        checker = HealthChecker("node-1", lambda: snap["s"], seen.append, rand=lambda: 0.0)
        checker.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while not seen:
            await asyncio.sleep(0.01)
        assert seen[-1] == {(LO, port, "shop/web")} and loop.time() - t0 < 0.5  # interval x threshold, and slack
        assert checker.describe()[0]["healthy"] is False and "503" in checker.describe()[0]["last"]
        snap["s"] = snapshot([Endpoint(LO, port, "node-1", "a", "shop")], dict(hc, http={"path": "/healthz"}))
        checker.refresh()
        while seen[-1]:
            await asyncio.sleep(0.01)
        snap["s"] = snapshot([Endpoint(LO, port, "node-1", "a", "shop")], None)
        checker.refresh()
        assert checker.describe() == []
        await checker.stop()
        app.close_all()
        server.close()
        del path
    asyncio.run(main())
