"""L7 on the outbound listener over loopback (no privileges): which connections are detected,
HTTP/1.1 handed to the driver with routing, everything else relayed as TCP byte for byte,
TCP metrics and active counts of L7 connections, drain.

Like tests/test_proxy_relay.py: an injected ``original_destination`` says the client
dialed a Service VIP whose endpoints are local backends.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from meshlab.testapp.httpserver import HTTPApp
from nodeagent.proxy import OutboundProxy, ProxyInputs, ProxyLimits
from nodeagent.proxy.destinations import Forward, Passthrough
from nodeagent.proxy.l7.detect import HTTP1, HTTP2_PRIOR_KNOWLEDGE, OPAQUE
from nodeagent.proxy.l7.metrics import HttpMetrics
from nodeagent.state import AgentState, ConfigObject, Endpoint, NodeSnapshot, Service, ServicePort
from nodeagent.telemetry import ProxyMetrics

pytestmark = pytest.mark.timeout(120)

NODE = "node-1"
NS = "shop"
LO = "127.0.0.1"
VIP = "198.19.0.10"  # only looked up in the snapshot, never dialed


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class Backend:
    """The test app (HTTP) on 127.0.0.1:0."""

    def __init__(self, pod: str, host: str = LO, node: str = NODE) -> None:
        self.pod = pod
        self.host = host
        self.app = HTTPApp(pod, node)
        self.server = None
        self.port = 0

    async def start(self) -> "Backend":
        self.server = await asyncio.get_running_loop().create_server(self.app.protocol_factory, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port, NODE, self.pod, NS)

    def close(self) -> None:
        self.app.close_all()
        self.server.close()


def snapshot(eps, *, app_protocol: str = "", routes=()) -> NodeSnapshot:
    svc = Service("web", NS, VIP, (ServicePort(80, eps[0].port, app_protocol=app_protocol),), tuple(eps))
    return NodeSnapshot(node=NODE, services=(svc,), config=tuple(routes))


def header_route(v2: str) -> ConfigObject:
    spec = {"parentRefs": [{"kind": "Service", "group": "", "name": "web"}],
            "rules": [{"matches": [{"headers": [{"name": "x-canary", "value": "1"}]}],
                       "backendRefs": [{"name": v2, "port": 80}]},
                      {"backendRefs": [{"name": "web", "port": 80}]}]}
    return ConfigObject("HTTPRoute", NS, "canary", json.dumps(spec))


class Proxy:
    def __init__(self, snap: NodeSnapshot, *, l7: bool = True, detect_timeout: float = 1.0,
                 stats_flush_interval: float = 30.0) -> None:
        self.state = AgentState()
        self.state.apply(snap)
        self.registry = CollectorRegistry()
        self.inputs = ProxyInputs(state=self.state, node=NODE, metrics=ProxyMetrics(self.registry),
                                  limits=ProxyLimits(detect_timeout=detect_timeout,
                                                     stats_flush_interval=stats_flush_interval),
                                  original_destination=lambda sock: (VIP, 80),
                                  http_metrics=HttpMetrics(self.registry) if l7 else None)
        self.listener = OutboundProxy(self.inputs, LO, 0)

    async def __aenter__(self) -> "Proxy":
        await self.listener.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.listener.drain(0)

    async def settle(self, active: int = 0) -> None:
        async with asyncio.timeout(20):
            while self.listener.active_connections != active:
                await asyncio.sleep(0.005)

    def metric(self, name: str, **labels) -> float:
        return sum(s.value for f in self.registry.collect() for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def http_get(port: int, paths, headers=None) -> list[tuple[int, dict, dict]]:
    """GETs on one keep-alive connection: (status, headers, JSON body) each."""
    c = http.client.HTTPConnection(LO, port, timeout=30)
    out = []
    try:
        for path in paths:
            c.request("GET", path, headers=headers or {})
            r = c.getresponse()
            body = r.read()
            out.append((r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(body) if body[:1] == b"{"
                        else body))
    finally:
        c.close()
    return out


# ------------------------------------------------------------------ when detection runs
def test_detection_runs_only_for_destinations_with_an_l7_need():
    async def main():
        ep = Endpoint("10.0.0.5", 8080, NODE, "pod", NS)
        cases = [
            (snapshot([ep]), None),  # no route, no policy, no appProtocol: plain TCP
            (snapshot([ep], app_protocol="tcp", routes=[header_route("web")]), None),
            (snapshot([ep], app_protocol="HTTP"), "http"),
            (snapshot([ep], routes=[header_route("web")]), "auto"),
            (snapshot([ep], app_protocol="grpc"), "h2"),
        ]
        for snap, want in cases:
            px = Proxy(snap)
            px.listener.loop = asyncio.get_running_loop()
            l7 = px.listener.l7
            fwd = Forward(ep, snap.services[0])
            det = l7.detector(snap, fwd, VIP, 80)
            if want is None:
                assert det is None
                continue
            assert det.decision is None and det.http_only == (want != "auto")
            if want == "h2":  # HTTP/1.x or the preface; silent clients get the declared HTTP/2
                assert det.http_default == HTTP2_PRIOR_KNOWLEDGE
                assert det.feed(b"GET / HTTP/1.1\r\n").protocol == HTTP1
            assert l7.detector(snap, Passthrough(VIP, 80), VIP, 80) is None
        # a pod IP, even the target of an HTTP Service port: workload-addressed traffic stays L4
        snap = snapshot([ep], app_protocol="http")
        assert Proxy(snap).listener.l7.detector(snap, Forward(ep), "10.0.0.5", 8080) is None
        assert Proxy(snap, l7=False).listener.l7 is None
    run(main())


# ------------------------------------------------------------------ HTTP through the driver
def test_http_is_routed_by_the_driver_and_tcp_metrics_are_kept():
    async def main():
        v1, v2 = await Backend("v1").start(), await Backend("v2").start()
        svc2 = Service("web-v2", NS, "198.19.0.11", (ServicePort(80, v2.port),), (v2.endpoint(),))
        snap = snapshot([v1.endpoint()], routes=[header_route("web-v2")])
        snap = NodeSnapshot(node=NODE, services=snap.services + (svc2,), config=snap.config)
        async with Proxy(snap) as px:
            plain = await asyncio.to_thread(http_get, px.listener.port, ["/a", "/b"])
            canary = await asyncio.to_thread(http_get, px.listener.port, ["/c"], {"x-canary": "1"})
            assert [r[0] for r in plain + canary] == [200, 200, 200]
            assert [r[2]["pod"] for r in plain] == ["v1", "v1"] and canary[0][2]["pod"] == "v2"
            assert plain[0][2]["headers"].get("x-forwarded-for") == LO  # the driver, not a byte relay
            await px.settle(0)
            assert px.metric("hostmesh_requests_total", request_protocol="http", response_code="200") == 3
            assert px.metric("hostmesh_tcp_connections_opened_total", destination_service="web.shop.svc.cluster.local") == 2
            assert px.metric("hostmesh_tcp_connections_closed_total", destination_service="web.shop.svc.cluster.local") == 2
            assert px.metric("hostmesh_tcp_received_bytes_total") > 0 and px.metric("hostmesh_tcp_sent_bytes_total") > 0
            routes = px.listener.l7.routes_view(snap)
            assert routes[0]["service"].startswith("web.") and routes[0]["l7"] == "detect"
            assert routes[0]["producer"]["routes"] == ["shop/canary"]
        v1.close()
        v2.close()
    run(main())


def test_no_endpoint_behind_a_route_is_a_proxy_made_503_uh():
    async def main():
        v1 = await Backend("v1").start()
        snap = NodeSnapshot(node=NODE, services=(
            Service("web", NS, VIP, (ServicePort(80, v1.port, app_protocol="http"),), (v1.endpoint(),)),
            Service("web-v2", NS, "198.19.0.11", (ServicePort(80, 80),), ())),
            config=(header_route("web-v2"),))
        async with Proxy(snap) as px:
            ((status, headers, _),) = await asyncio.to_thread(http_get, px.listener.port, ["/"], {"x-canary": "1"})
            assert status == 503 and headers["x-hostmesh-flags"] == "UH"
        v1.close()
    run(main())


# ------------------------------------------------------------------ TCP after detection
async def _serve_tcp(handler):
    server = await asyncio.start_server(handler, LO, 0)
    return server, server.sockets[0].getsockname()[1]


def test_server_speaks_first_gets_tcp_after_the_detection_timeout():
    async def greeter(reader, writer):
        writer.write(b"220 hello\r\n")
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    async def main():
        server, port = await _serve_tcp(greeter)
        snap = snapshot([Endpoint(LO, port, NODE, "smtp", NS)], routes=[header_route("web")])
        async with Proxy(snap, detect_timeout=0.2) as px:
            r, w = await asyncio.open_connection(LO, px.listener.port)
            assert await asyncio.wait_for(r.readline(), 20) == b"220 hello\r\n"
            w.write(b"EHLO!")
            assert await asyncio.wait_for(r.read(), 20) == b"EHLO!"
            w.close()
            await px.settle(0)
            assert px.metric("hostmesh_tcp_connections_closed_total", request_protocol="tcp") == 1
        server.close()
    run(main())


@pytest.mark.parametrize("first", [b"\x16\x03\x01\x00\x10\x01tls-client-hello", b"\x00\x01binary", b"GE"])
def test_non_http_bytes_are_relayed_unchanged_with_half_close(first):
    async def echo(reader, writer):
        writer.write(await reader.read())  # until EOF: the half-close must arrive
        await writer.drain()
        writer.close()

    async def main():
        server, port = await _serve_tcp(echo)
        snap = snapshot([Endpoint(LO, port, NODE, "echo", NS)], routes=[header_route("web")])
        async with Proxy(snap) as px:
            r, w = await asyncio.open_connection(LO, px.listener.port)
            w.write(first)
            w.write_eof()  # "GE" then EOF: decided on EOF, still TCP
            assert await asyncio.wait_for(r.read(), 20) == first
            w.close()
            await px.settle(0)
        server.close()
    run(main())


def test_drain_closes_idle_keep_alive_l7_connections():
    async def main():
        v1 = await Backend("v1").start()
        async with Proxy(snapshot([v1.endpoint()], app_protocol="http")) as px:
            r, w = await asyncio.open_connection(LO, px.listener.port)
            w.write(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 20)
            assert head.startswith(b"HTTP/1.1 200")
            assert px.listener.active_connections == 1
            assert await px.listener.drain(10) == 0  # idle: closed by the driver, not aborted
            assert px.listener.active_connections == 0
            w.close()
        v1.close()
    run(main())


def test_detected_protocols_map_to_serve_functions_or_tcp():
    from nodeagent.proxy.l7.http2_proxy import serve_http2
    from nodeagent.proxy.l7dispatch import SERVE
    assert HTTP1 in SERVE and OPAQUE not in SERVE and SERVE[HTTP2_PRIOR_KNOWLEDGE] is serve_http2


def test_http2_prior_knowledge_is_served_by_the_http2_driver_with_routes():
    async def main():
        v1, v2 = await Backend("v1").start(), await Backend("v2").start()
        snap = snapshot([v1.endpoint(), v2.endpoint()], routes=[header_route("v2")])
        snap = NodeSnapshot(node=NODE, services=snap.services + (
            Service("v2", NS, "198.19.9.9", (ServicePort(80, v2.port),), (v2.endpoint(),)),), config=snap.config)
        async with Proxy(snap) as px:
            def curl(*extra: str) -> dict:
                r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "10", *extra,
                                    f"http://{LO}:{px.listener.port}/"], capture_output=True, text=True, timeout=30)
                assert r.returncode == 0, r.stderr
                return json.loads(r.stdout)
            plain = await asyncio.to_thread(curl)
            canary = await asyncio.to_thread(curl, "-H", "x-canary: 1")
            assert plain["protocol"] == "HTTP/1.1"  # an HTTP/2 client, an HTTP/1.1 upstream
            assert canary["pod"] == "v2"
            await px.settle(0)
            assert px.metric("hostmesh_requests_total", request_protocol="http2", response_code="200") == 2
        v1.close()
        v2.close()
    run(main())


def test_an_http2_port_serves_http1_clients_translated_and_prior_knowledge_clients_as_http2():
    async def main():
        v1 = await Backend("v1").start()
        async with Proxy(snapshot([v1.endpoint()], app_protocol="http2")) as px:
            def curl(*extra: str) -> dict:
                r = subprocess.run(["curl", "-sS", "--max-time", "10", *extra, f"http://{LO}:{px.listener.port}/x"],
                                   capture_output=True, text=True, timeout=30)
                assert r.returncode == 0, r.stderr
                return json.loads(r.stdout)
            h1 = await asyncio.to_thread(curl, "--http1.1")
            h2 = await asyncio.to_thread(curl, "--http2-prior-knowledge")
            assert h1["protocol"] == h2["protocol"] == "HTTP/2"  # the HTTP/1.1 client's request was translated
            await px.settle(0)
            assert px.metric("hostmesh_requests_total", request_protocol="http", response_code="200") == 1
            assert px.metric("hostmesh_requests_total", request_protocol="http2", response_code="200") == 1
        v1.close()
    run(main())


def test_a_service_without_endpoints_answers_http_with_503_uh_and_resets_tcp():
    async def main():
        snap = NodeSnapshot(node=NODE, services=(  # routes attached, no appProtocol: detected
            Service("web", NS, VIP, (ServicePort(80, 8080),), ()),), config=(header_route("web"),))
        async with Proxy(snap) as px:
            ((status, headers, _),) = await asyncio.to_thread(http_get, px.listener.port, ["/"])
            assert status == 503 and headers["x-hostmesh-flags"] == "UH"
            r, w = await asyncio.open_connection(LO, px.listener.port)
            w.write(b"\x00\x01binary")  # not HTTP: the L4 refusal
            with pytest.raises(ConnectionResetError):
                assert await asyncio.wait_for(r.read(), 20) == b""
            w.close()
            await px.settle(0)
            assert px.metric("hostmesh_agent_connections_rejected_total", reason="no_healthy_upstream") == 1
    run(main())


# ------------------------------------------------------------------ over the mTLS tunnel
def _tunnel_mesh(app_port: int):
    from tests.tunnelharness import POD_IP, Mesh
    web = Service("web", "shop", VIP, (ServicePort(80, app_port, app_protocol="http"),),
                  (Endpoint(POD_IP, app_port, "node-2", "web", "shop"),))
    return Mesh(services=(web,), l7=True, tap=True)


def test_l7_upstream_crosses_nodes_over_the_tunnel_and_pools_per_stream():
    from tests.tunnelharness import CLIENT_ID, POD_IP, WEB_ID

    async def main():
        web = await Backend("web", POD_IP, "node-2").start()
        async with _tunnel_mesh(web.port) as m:
            m.dst = (VIP, 80)
            out = await asyncio.to_thread(http_get, m.out.port, ["/secret-path-1", "/secret-path-2"])
            out += await asyncio.to_thread(http_get, m.out.port, ["/secret-path-3"])
            assert [(s, b["pod"]) for s, _, b in out] == [(200, "web")] * 3
            async with asyncio.timeout(20):  # node-2 keeps the pooled stream's relay open
                while m.out.active_connections:
                    await asyncio.sleep(0.005)
            assert b"secret-path" not in m.tap.wire  # only ciphertext between the proxies
            # one TLS handshake, one stream: the HTTP connection was pooled across client connections
            assert m.m1("hostmesh_agent_tunnel_handshakes_total", result="ok") == 1
            assert m.m2("hostmesh_tcp_connections_opened_total", reporter="destination",
                        connection_security_policy="mutual_tls", source_principal=CLIENT_ID.uri,
                        destination_principal=WEB_ID.uri) == 1
            assert m.m1("hostmesh_requests_total", request_protocol="http", response_code="200") == 3
            # rotation: the pooled HTTP connection (and its TLS connection) is not reused
            m.ids1.add(CLIENT_ID, m.ca.leaf(CLIENT_ID))
            ((status, _, _),) = await asyncio.to_thread(http_get, m.out.port, ["/after-rotation"])
            assert status == 200
            assert m.m1("hostmesh_agent_tunnel_handshakes_total", result="ok") == 2
        web.close()
    run(main())


def test_l7_without_a_client_certificate_fails_closed_with_503_uf():
    from tests.tunnelharness import CLIENT_ID, POD_IP

    async def main():
        web = await Backend("web", POD_IP, "node-2").start()
        async with _tunnel_mesh(web.port) as m:
            m.dst = (VIP, 80)
            m.ids1.remove(CLIENT_ID)
            ((status, headers, _),) = await asyncio.to_thread(http_get, m.out.port, ["/"])
            assert status == 503 and headers["x-hostmesh-flags"] == "UF"
            assert m.m2("hostmesh_tcp_connections_opened_total") == 0  # nothing reached node-2, plaintext or not
            assert m.m1("hostmesh_agent_connections_rejected_total", reason="no_client_certificate") == 1
        web.close()
    run(main())


def test_detect_timeout_must_be_positive():
    with pytest.raises(ValueError, match="detect_timeout"):
        ProxyLimits(detect_timeout=0)


# ------------------------------------------------------------------ request labels and the tunnel
def test_request_labels_take_the_principals_of_a_tunnelled_endpoint_once_per_connection():
    from types import SimpleNamespace

    from nodeagent.proxy.l7.metrics import http_labels
    from nodeagent.proxy.l7.shared import labels_for

    here, there = Endpoint("10.0.0.5", 8080, NODE, "a", NS), Endpoint("10.0.1.5", 8080, "node-b", "b", NS)
    calls = []

    def secure(ctx, labels, ep):
        calls.append(ep)
        if ep.node == NODE:
            return labels
        return labels._replace(source_principal="spiffe://td/ns/x/sa/c", destination_principal="spiffe://td/ns/x/sa/s",
                               connection_security_policy="mutual_tls")

    ctx = SimpleNamespace(labels=http_labels("source", "client", NS), secure_labels=secure, snapshot=None)
    cache: dict = {}
    remote = labels_for(cache, ctx, None, there)
    assert (remote.connection_security_policy, remote.source_principal, remote.destination_principal,
            remote.destination_workload) == ("mutual_tls", "spiffe://td/ns/x/sa/c", "spiffe://td/ns/x/sa/s", "b")
    local = labels_for(cache, ctx, None, here)
    assert (local.connection_security_policy, local.source_principal) == ("none", "unknown")
    assert labels_for(cache, ctx, None, there) is remote and calls == [there, here]  # cached per connection
    assert labels_for({}, ctx, None, None).connection_security_policy == "none"  # no endpoint (proxy-made error)
    plain = SimpleNamespace(labels=ctx.labels, secure_labels=None, snapshot=None)  # no tunnel on this proxy
    assert labels_for({}, plain, None, there).connection_security_policy == "none"


def test_tcp_bytes_of_an_open_l7_connection_are_flushed_every_tick_and_counted_once():
    async def main():
        be = await Backend("a").start()
        try:
            async with Proxy(snapshot([be.endpoint()], app_protocol="http"), stats_flush_interval=0.2) as px:
                port = px.listener.port
                reader, writer = await asyncio.open_connection(LO, port)
                writer.write(b"GET /x HTTP/1.1\r\nhost: web\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(v for k, v in (ln.split(b": ", 1) for ln in head.split(b"\r\n")[1:] if b": " in ln)
                                  if k.lower() == b"content-length"))
                await reader.readexactly(length)
                sent = len(head) + length
                # still open (keep-alive): the counters move within a tick or two, not at close
                async with asyncio.timeout(10):
                    while px.metric("hostmesh_tcp_sent_bytes_total") < sent:
                        await asyncio.sleep(0.05)
                assert px.metric("hostmesh_tcp_received_bytes_total") == len(b"GET /x HTTP/1.1\r\nhost: web\r\n\r\n")
                assert px.metric("hostmesh_tcp_connections_closed_total") == 0
                writer.close()
                await px.settle()
                # closing publishes only what was not flushed yet: every byte counted once
                assert px.metric("hostmesh_tcp_sent_bytes_total") == sent
                assert px.metric("hostmesh_tcp_connections_closed_total") == 1
        finally:
            be.close()
    run(main())
