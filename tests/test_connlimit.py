"""TrafficPolicy connectionRateLimit: the bucket logic without I/O, then through the outbound
listener over loopback (a TCP port and an HTTP port: both reset past the limit, counted).
The lab version is in tests/test_resilience_lab.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from nodeagent.proxy.connlimit import ConnectionRateLimits, connection_rate_policy, merge_views
from nodeagent.state import ConfigObject, Endpoint, NodeSnapshot, Service, ServicePort
from nodeagent.telemetry import TcpLabels
from tests.test_l7_dispatch import LO, NODE, NS, VIP, Backend, Proxy, _serve_tcp, http_get, run

pytestmark = pytest.mark.timeout(60)

CLIENT_A = TcpLabels("source", source_workload="a")
CLIENT_B = TcpLabels("source", source_workload="b")


def policy(limit: dict, name: str = "web", policy_name: str = "p") -> ConfigObject:
    spec = {"targetRef": {"group": "", "kind": "Service", "name": name}, "connectionRateLimit": limit}
    return ConfigObject("TrafficPolicy", NS, policy_name, json.dumps(spec))


def snap(*config: ConfigObject, app_protocol: str = "tcp", port: int = 9) -> NodeSnapshot:
    svc = Service("web", NS, VIP, (ServicePort(80, port, app_protocol=app_protocol),),
                  (Endpoint(LO, port, NODE, "web-1", NS),))
    return NodeSnapshot(node=NODE, services=(svc,), config=config)


def admitted(limits: ConnectionRateLimits, s: NodeSnapshot, times, labels=CLIENT_A) -> list[bool]:
    return [limits.admit(s, s.services[0], 80, labels, t) for t in times]


# ------------------------------------------------------------------ no I/O
def test_the_burst_then_the_rate_per_service_port():
    s = snap(policy({"connectionsPerUnit": 2, "unit": "second", "burst": 3}))
    limits = ConnectionRateLimits()
    assert admitted(limits, s, [0, 0, 0, 0, 0.4, 0.5, 1.0]) == [True, True, True, False, False, True, True]
    view = limits.view()["shop/web/80"]["summary"]["connectionRateLimit"]
    assert view == {"tokensPerSecond": 2.0, "burst": 3.0, "perSourceWorkload": False, "rateLimited": 2}


def test_units_and_the_default_burst():
    p = connection_rate_policy({"connectionsPerUnit": 60, "unit": "minute"})
    assert (p.rate, p.burst, p.per_source) == (1.0, 60.0, False)
    assert connection_rate_policy(None) is None


def test_a_worker_enforces_its_share_and_at_least_one():
    p = connection_rate_policy({"connectionsPerUnit": 10, "unit": "second", "burst": 1}, share=0.5)
    assert (p.rate, p.burst) == (5.0, 1.0)


def test_per_source_workload_buckets_are_separate():
    s = snap(policy({"connectionsPerUnit": 1, "unit": "hour", "perSourceWorkload": True}))
    limits = ConnectionRateLimits()
    assert admitted(limits, s, [0, 1], CLIENT_A) == [True, False]
    assert admitted(limits, s, [2, 3], CLIENT_B) == [True, False]


def test_no_policy_or_another_service_is_not_limited():
    limits = ConnectionRateLimits()
    assert admitted(limits, snap(), [0] * 50) == [True] * 50
    other = snap(policy({"connectionsPerUnit": 1, "unit": "hour"}, name="db"))
    assert admitted(limits, other, [0] * 5) == [True] * 5
    assert limits.view() == {}


def test_buckets_survive_an_unchanged_policy_and_reset_on_a_changed_one():
    limits = ConnectionRateLimits()
    first = snap(policy({"connectionsPerUnit": 1, "unit": "hour"}))
    assert admitted(limits, first, [0, 0]) == [True, False]
    same = snap(policy({"connectionsPerUnit": 1, "unit": "hour"}))  # a new snapshot object
    assert admitted(limits, same, [1]) == [False]
    changed = snap(policy({"connectionsPerUnit": 2, "unit": "hour"}))
    assert admitted(limits, changed, [2, 2, 2]) == [True, True, False]
    assert admitted(limits, snap(), [3]) == [True] and limits.view() == {}  # policy gone: state gone


def test_the_traffic_policy_the_route_table_picks_wins():
    s = snap(policy({"connectionsPerUnit": 1, "unit": "hour"}, policy_name="b"),
             policy({"connectionsPerUnit": 5, "unit": "hour"}, policy_name="a"))
    assert admitted(ConnectionRateLimits(), s, [0] * 6) == [True] * 5 + [False]


def test_views_of_one_process_merge_by_destination():
    http = {"shop/web/80": {"summary": {"rateLimited": 3}, "endpoints": {"a:1": {"ejected": False}}}}
    tcp = {"shop/web/80": {"summary": {"connectionRateLimit": {"rateLimited": 1}}, "endpoints": {}},
           "shop/db/5432": {"summary": {"connectionRateLimit": {"rateLimited": 2}}, "endpoints": {}}}
    m = merge_views(http, tcp)
    assert m["shop/web/80"] == {"summary": {"rateLimited": 3, "connectionRateLimit": {"rateLimited": 1}},
                                "endpoints": {"a:1": {"ejected": False}}}
    assert set(m) == {"shop/web/80", "shop/db/5432"} and http["shop/web/80"]["summary"] == {"rateLimited": 3}


# ------------------------------------------------------------------ through the listener
async def _echo(reader, writer):
    writer.write(await reader.read(100))
    await writer.drain()
    writer.close()


async def _tcp_exchange(port: int) -> bytes | None:
    """One connection: the echoed bytes, or None when the proxy reset it."""
    r, w = await asyncio.open_connection(LO, port)
    try:
        w.write(b"ping")
        return await asyncio.wait_for(r.read(), 20)
    except ConnectionResetError:
        return None
    finally:
        w.close()


@pytest.mark.parametrize("l7", [True, False])
def test_tcp_connections_past_the_limit_are_reset_and_counted(l7):
    async def main():
        server, port = await _serve_tcp(_echo)
        s = snap(policy({"connectionsPerUnit": 3, "unit": "hour"}), port=port)
        async with Proxy(s, l7=l7) as px:
            got = [await _tcp_exchange(px.listener.port) for _ in range(5)]
            assert got == [b"ping"] * 3 + [None] * 2
            await px.settle(0)
            assert px.metric("hostmesh_agent_connections_rejected_total", reason="rate_limited") == 2
            assert px.metric("hostmesh_tcp_connections_opened_total", response_flags="RL",
                             destination_service="web.shop.svc.cluster.local") == 2
            view = px.listener.resilience_view()["shop/web/80"]["summary"]["connectionRateLimit"]
            assert view["rateLimited"] == 2 and view["burst"] == 3.0
        server.close()
    run(main())


def test_the_limit_counts_connections_not_requests_on_an_http_port():
    async def main():
        web = await Backend("web-1").start()
        s = snap(policy({"connectionsPerUnit": 1, "unit": "hour"}), app_protocol="http", port=web.port)
        async with Proxy(s) as px:
            out = await asyncio.to_thread(http_get, px.listener.port, ["/a", "/b", "/c"])  # one connection
            assert [o[0] for o in out] == [200, 200, 200]
            with pytest.raises(ConnectionError):
                await asyncio.to_thread(http_get, px.listener.port, ["/d"])
            await px.settle(0)
            assert px.metric("hostmesh_agent_connections_rejected_total", reason="rate_limited") == 1
        web.close()
    run(main())
